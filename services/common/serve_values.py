"""What the serving settings accept, in one place with no dependencies: the services' Settings
(pydantic) and the trainer's check of its `serve` config group (Hydra) both apply these rules."""

from __future__ import annotations

import re

# What torch.device accepts for the devices the worker serves on, matched without importing
# torch: the API reads these settings too and must stay light.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def serve_device(value: object, name: str = "device") -> str:
    """The device in lower case, or ValueError naming `name`."""
    text = str(value).strip().lower()
    if not DEVICE_PATTERN.fullmatch(text):
        raise ValueError(f"{name} must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def serve_precision(value: object, name: str = "mixed_precision") -> str:
    """auto | bf16 | fp16 | fp32 in any case, or the seed's booleans (true = auto, false =
    fp32); ValueError naming `name` otherwise."""
    text = str(value).strip().lower()
    text = {"true": "auto", "false": "fp32"}.get(text, text)
    if text not in PRECISIONS:
        raise ValueError(f"{name} must be auto, bf16, fp16, fp32, true or false")
    return text
