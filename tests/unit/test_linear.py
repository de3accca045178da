"""lmcore.linear: the oneDNN CPU linear equals F.linear forward and backward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lmcore import linear as lin
from lmcore.config import preset
from lmcore.model import Transformer

pytestmark = pytest.mark.unit

needs_onednn = pytest.mark.usefixtures("onednn_forced")  # skipped where the op does not run


def _ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.fixture
def onednn_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lin, "onednn_enabled", lambda: False)


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad_out = torch.randn(*shape[:-1], 40)

    y = lin.linear(x, w, b)
    y.backward(grad_out)
    got = [x.grad, w.grad] + ([b.grad] if bias else [])
    for t in [x, w] + ([b] if bias else []):
        t.grad = None
    want_y = F.linear(x, w, b)
    want_y.backward(grad_out)
    want = [x.grad, w.grad] + ([b.grad] if bias else [])

    # Same products, summed in another order by another library: fp32 rounding apart.
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for g, wg in zip(got, want):
        torch.testing.assert_close(g, wg, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_strided_inputs_and_weights_give_the_same_product() -> None:
    torch.manual_seed(1)
    x = torch.randn(24, 9).t()  # (9, 24), not contiguous
    w = torch.randn(24, 40).t()  # (40, 24), column-major
    torch.testing.assert_close(lin.linear(x, w, None), F.linear(x, w, None), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("kernel", ["onednn", "blas", "bag"])
def test_an_input_of_the_wrong_width_gets_torchs_shape_error(kernel: str) -> None:
    layer = lin.Linear(64, 96)
    layer.one_row_kernel = kernel  # type: ignore[assignment]
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.randn(2, 65))


@needs_onednn
def test_fp32_cpu_linear_runs_through_onednn_and_bf16_does_not() -> None:
    layer = lin.Linear(16, 8)
    x = torch.randn(4, 16)
    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: layer(x))
    training = _ops_run(lambda: layer(x.requires_grad_()).sum().backward())
    assert "mkldnn::_linear_pointwise" in training
    bf16 = lin.Linear(16, 8).to(torch.bfloat16)
    ops = _ops_run(lambda: bf16(x.detach().to(torch.bfloat16)))
    assert "mkldnn::_linear_pointwise" not in ops and "aten::linear" in ops


def test_switched_off_it_is_plain_f_linear(onednn_off: None) -> None:
    layer = lin.Linear(16, 8)
    x = torch.randn(4, 16)
    ops = _ops_run(lambda: layer(x))
    assert "mkldnn::_linear_pointwise" not in ops and "aten::linear" in ops


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """onednn_enabled() decided afresh under the test's environment, and again after it."""
    lin.onednn_enabled.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    lin.onednn_enabled.cache_clear()


def test_environment_switch_turns_onednn_off(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv(lin.ENV_SWITCH, "0")
    fresh_choice.setattr(lin, "mkl_leaves_avx512_unused", lambda: True)
    assert lin.onednn_enabled() is False


@pytest.mark.skipif(not lin.onednn_supported(), reason="oneDNN's linear op does not run here")
def test_environment_switch_forces_onednn_where_the_blas_would_be_chosen(
    fresh_choice: pytest.MonkeyPatch,
) -> None:
    fresh_choice.setattr(lin, "mkl_leaves_avx512_unused", lambda: False)
    fresh_choice.delenv(lin.ENV_SWITCH, raising=False)
    assert lin.onednn_enabled() is False
    lin.onednn_enabled.cache_clear()
    fresh_choice.setenv(lin.ENV_SWITCH, "1")
    assert lin.onednn_enabled() is True


@pytest.mark.skipif(not lin.onednn_supported(), reason="oneDNN's linear op does not run here")
@pytest.mark.parametrize(
    "capability, vendor, expected",
    [
        ("AVX512", "AuthenticAMD", True),  # Zen 4/5: MKL stays on AVX2, oneDNN ~2.1x
        ("AVX2", "AuthenticAMD", False),  # Zen 3: both on AVX2, MKL's kernels faster
        ("AVX512", "GenuineIntel", False),  # MKL runs its own AVX-512 kernels
        ("AVX512", "", False),  # unknown vendor: keep PyTorch's default
    ],
)
def test_auto_choice_is_onednn_only_where_mkl_leaves_avx512_unused(
    fresh_choice: pytest.MonkeyPatch, capability: str, vendor: str, expected: bool
) -> None:
    if not torch.backends.mkl.is_available():
        pytest.skip("the rule is about MKL, which this torch build lacks")
    fresh_choice.delenv(lin.ENV_SWITCH, raising=False)
    fresh_choice.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    fresh_choice.setattr(lin, "cpu_vendor", lambda: vendor)
    assert lin.onednn_enabled() is expected


def test_cpu_vendor_reads_this_machines_vendor() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    vendors = {line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
               if line.startswith("vendor_id")}  # fmt: skip
    if not vendors:
        pytest.skip("/proc/cpuinfo names no vendor (not x86)")
    assert lin.cpu_vendor() in vendors


@needs_onednn
def test_model_gradients_match_the_plain_f_linear_model(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    model = Transformer(preset("tiny"))
    idx = torch.randint(0, model.config.vocab_size, (2, 16))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(idx, idx)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast = grads()
    monkeypatch.setattr(lin, "onednn_enabled", lambda: False)
    plain = grads()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_bag_linear_equals_f_linear_for_either_weight_order(
    column_major: bool, bias: bool
) -> None:
    torch.manual_seed(3)
    w = torch.randn(40, 24)
    if column_major:
        w = w.t().contiguous().t()
    b = torch.randn(40) if bias else None
    strided = torch.randn(1, 48)[:, ::2]  # a view with stride 2: the row is not contiguous
    few_rows = [torch.randn(2, 24), torch.randn(3, 1, 24), torch.randn(2, 2, 24)]
    for x in [torch.randn(24), torch.randn(1, 24), torch.randn(1, 1, 24), strided, *few_rows]:
        out = lin.bag_linear(x, w, b)
        assert out.shape == (*x.shape[:-1], 40)
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_bag_linear_made_under_inference_mode_still_trains() -> None:
    # Its index tensors are cached at the first call; one made under inference_mode must not
    # become an inference tensor that a later backward refuses to save.
    layer = lin.Linear(20, 12)
    layer.one_row_kernel = "bag"
    with torch.inference_mode():
        layer(torch.randn(1, 20))
    x = torch.randn(1, 20, requires_grad=True)
    layer(x).square().sum().backward()
    ref = torch.nn.Linear(20, 12)
    ref.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


def test_bag_kernel_takes_up_to_bag_rows_rows_and_leaves_autocast_to_f_linear() -> None:
    layer = lin.Linear(16, 8)
    layer.one_row_kernel = "bag"
    one, two, three = torch.randn(1, 16), torch.randn(2, 16), torch.randn(3, 16)
    assert "aten::embedding_bag" in _ops_run(lambda: layer(one))
    assert "aten::embedding_bag" not in _ops_run(lambda: layer(two))  # bag_rows defaults to 1
    layer.bag_rows = 2
    assert "aten::embedding_bag" in _ops_run(lambda: layer(two))
    assert "aten::embedding_bag" not in _ops_run(lambda: layer(three))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops = _ops_run(lambda: layer(one))
        assert layer(one).dtype == torch.bfloat16
    assert "aten::embedding_bag" not in ops and "aten::linear" in ops
