"""The training service: Hydra config -> corpus -> lmcore Trainer -> MLflow.

`python -m services.trainer`; importing the package must stay cheap (Hydra, MLflow and matplotlib
load only when a run starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcore.train import TrainResult


def run(cfg: Any, **kwargs: Any) -> TrainResult:
    """Train from a composed config (DictConfig or RootConfig); see services.trainer.job.run."""
    from services.trainer.job import run as _run

    return _run(cfg, **kwargs)


def compose(overrides: list[str] | None = None) -> Any:
    """The config Hydra composes from config/ with these overrides (validated, unresolved)."""
    from services.trainer.schema import compose as _compose

    return _compose(overrides or [])


__all__ = ["compose", "run"]
