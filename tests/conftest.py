"""Shared test fixtures: small models, seeded RNG, and the repo paths tests need."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Two cores shared by test processes: one BLAS thread each keeps runs predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a core dependency
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def onednn_forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """oneDNN for every fp32 CPU linear, as on a machine whose auto choice is oneDNN, so its
    path is tested wherever its op runs (the auto choice may be the BLAS here)."""
    from lmcore import linear

    if not linear.onednn_supported():
        pytest.skip("oneDNN's linear op does not run here")
    monkeypatch.setenv(linear.ENV_SWITCH, "1")
    linear.onednn_enabled.cache_clear()
    yield
    monkeypatch.undo()
    linear.onednn_enabled.cache_clear()
