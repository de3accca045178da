"""lmcore.precision: which autocast dtype `auto` picks on each kind of device."""

from __future__ import annotations

import pytest
import torch

from lmcore.precision import resolve_precision

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
     ((9, 0), torch.bfloat16)],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_is_bf16_from_ampere_on_and_fp16_with_a_scaler_before(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: torch.dtype
) -> None:
    # No GPU here: the device's compute capability is what the choice reads. torch's own
    # is_bf16_supported() says True on every CUDA GPU (emulation counts), so it must not decide.
    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability
    )
    precision = resolve_precision("auto", "cuda:1")
    assert precision.dtype == expected
    assert asked == [torch.device("cuda:1")]  # the device asked about, not the current one


@pytest.mark.parametrize("requested", ["auto", True])
def test_auto_is_fp32_on_the_cpu(requested: object) -> None:
    assert resolve_precision(requested, "cpu").dtype == torch.float32  # type: ignore[arg-type]


@pytest.mark.parametrize("requested", ["bf16", "fp16"])
def test_an_explicit_half_precision_is_honoured_on_any_device(requested: str) -> None:
    expected = torch.bfloat16 if requested == "bf16" else torch.float16
    assert resolve_precision(requested, "cpu").dtype == expected  # type: ignore[arg-type]


def test_an_unknown_precision_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        resolve_precision("fp8", "cpu")  # type: ignore[arg-type]
