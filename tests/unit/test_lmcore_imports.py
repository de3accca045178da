"""lmcore runs on a bare GPU box: torch, numpy, tokenizers and safetensors only at module level."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmcore

pytestmark = pytest.mark.unit

ALLOWED = {"torch", "numpy", "tokenizers", "safetensors", "lmcore", "__future__"}
ALLOWED |= set(sys.stdlib_module_names)
MODULES = sorted(m.name for m in pkgutil.iter_modules(lmcore.__path__))
HEAVY = ("mlflow", "hydra", "omegaconf", "celery", "fastapi", "redis", "tqdm", "matplotlib", "pandas")


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Imports that run when the module is imported (not inside functions or TYPE_CHECKING)."""
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_only_the_allowed_packages(module: str) -> None:
    path = Path(lmcore.__path__[0]) / f"{module}.py"
    names = _top_level_imports(ast.parse(path.read_text()))
    assert [n for n in names if n.split(".")[0] not in ALLOWED] == []


def test_importing_every_module_loads_no_service_framework() -> None:
    code = (
        "import sys, importlib\n"
        f"for m in {MODULES!r}: importlib.import_module('lmcore.' + m)\n"
        f"print(','.join(sorted(h for h in {HEAVY!r} if h in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # torch itself may pull tqdm in; everything else must stay out.
    assert set(filter(None, out.stdout.strip().split(","))) <= {"tqdm"}


def test_sampling_loads_no_model_cache_or_generation_loop() -> None:
    # Sampling is pure per-step math over logits: changing it must not drag in the decode loop.
    code = (
        "import sys, lmcore.sampling\n"
        "print(','.join(m for m in ('lmcore.model', 'lmcore.cache', 'lmcore.generate', "
        "'lmcore.engine') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_readme_quick_start_imports_sampling_params_from_generate() -> None:
    # README.md's "Library quick start": `from lmcore.generate import SamplingParams, generate_ids`.
    from lmcore.generate import SamplingParams, generate_ids
    from lmcore.sampling import SamplingParams as sampling_params

    assert SamplingParams is sampling_params and callable(generate_ids)
