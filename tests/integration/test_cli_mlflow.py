"""`lmctl promote` and `lmctl generate --model models:/...` against a real `mlflow server`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcore.checkpoint import load_model_dir, save_model_dir
from lmcore.config import preset
from lmcore.generate import SamplingParams, generate
from lmcore.model import Transformer
from lmcore.registry import current_version
from lmcore.tokenizer import Tokenizer
from lmcore.tracking import MlflowTracker
from services import cli
from tests.helpers.mlflow_server import mlflow_server

pytestmark = pytest.mark.integration


def make_model_dir(path: Path, seed: int) -> Path:
    tokenizer = Tokenizer.train(["the quick brown fox jumps over the lazy dog. " * 40], 300)
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1))
    return save_model_dir(path, model, tokenizer, {"seed": seed})


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A server holding versions 1 and 2 of `llm-cli` (the candidate alias on 2)."""
    root = tmp_path_factory.mktemp("cli-mlflow")
    with mlflow_server(root / "mlflow") as uri:
        tracker = MlflowTracker(uri, retry_s=0.5)
        tracker.start_run("cli")
        dirs = [make_model_dir(root / f"model{seed}", seed) for seed in (0, 1)]
        for model_dir in dirs:
            tracker.log_model_dir(model_dir, "llm-cli")
        tracker.end_run()
        yield {"uri": uri, "dirs": dirs}


def lmctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_promote_moves_the_alias(registry, capsys) -> None:
    uri = registry["uri"]
    for version in ("1", "2", "1"):
        code, out, err = lmctl(capsys, "promote", "--name", "llm-cli", "--version", version,
                               "--alias", "production", "--tracking-uri", uri)  # fmt: skip
        assert code == 0, err
        assert out == f"llm-cli@production -> version {version}\n"
        assert current_version("llm-cli", "production", uri).version == version


def test_promoting_a_missing_version_is_one_line_error(registry, capsys) -> None:
    code, _, err = lmctl(capsys, "promote", "--name", "llm-cli", "--version", "9",
                         "--tracking-uri", registry["uri"])  # fmt: skip
    assert code == 1
    assert err == f"error: model version llm-cli/9 not found on {registry['uri']}\n"


def test_generate_resolves_a_registry_alias(registry, capsys, tmp_path: Path) -> None:
    code, out, err = lmctl(capsys, "generate", "--model", "models:/llm-cli@candidate",
                           "--tracking-uri", registry["uri"], "--cache-dir", str(tmp_path),
                           "--seed", "5", "-n", "6", "--no-echo", "fox")  # fmt: skip
    assert code == 0, err
    loaded = load_model_dir(registry["dirs"][1])  # candidate = the latest version
    [expected] = generate(loaded.model, loaded.tokenizer, ["fox"],
                          SamplingParams(max_new_tokens=6, temperature=0.8, seed=5))  # fmt: skip
    assert out == expected.text + "\n"


def test_generate_with_an_unknown_alias_is_one_line_error(registry, capsys, tmp_path) -> None:
    code, out, err = lmctl(capsys, "generate", "--model", "models:/llm-cli@nope", "--tracking-uri",
                           registry["uri"], "--cache-dir", str(tmp_path), "hi")  # fmt: skip
    assert code == 1 and out == ""
    assert err.startswith("error: models:/llm-cli@nope not found") and err.count("\n") == 1
