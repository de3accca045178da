"""Small random models for tests whose outputs depend on the whole context."""

from __future__ import annotations

import torch

from lmcore.config import preset
from lmcore.model import Transformer


def context_sensitive_model(seed: int = 0, **overrides: object) -> Transformer:
    """A tiny model with large random weights, in eval mode.

    At the usual 0.02 init an untrained model with tied embeddings just repeats its last token,
    which would make greedy comparisons trivially equal; these weights use the whole context.
    """
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model
