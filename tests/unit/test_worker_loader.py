"""The worker's model loading honours the seed's inference keys (quantized, precision, kv_cache)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lmcore.checkpoint import CheckpointError, save_model_dir
from lmcore.config import ConfigError, preset
from lmcore.inference_layout import ShapeChoice
from lmcore.linear import Linear
from lmcore.mlflow_client import InvalidModelUriError, ModelNotFoundError, TrackingError
from lmcore.model import Transformer
from lmcore.quantize import Int8Linear
from lmcore.tokenizer import Tokenizer
from services.common.settings import Settings
from services.worker.loader import (
    FatalLoadError,
    cannot_fix_itself,
    load_serving_model,
    pick_device,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = Tokenizer.train(["to be or not to be, that is the question. " * 30], 300)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1))
    return save_model_dir(tmp_path_factory.mktemp("loader") / "model", model, tokenizer)


def test_quantized_setting_loads_int8_linears(model_dir: Path) -> None:
    served = load_serving_model(str(model_dir), Settings(device="cpu", quantized=True))
    assert any(isinstance(m, Int8Linear) for m in served.model.modules())
    plain = load_serving_model(str(model_dir), Settings(device="cpu"))
    assert not any(isinstance(m, Int8Linear) for m in plain.model.modules())


def test_the_layout_is_measured_for_the_dtype_and_int8_layers_that_serve(model_dir: Path) -> None:
    served = load_serving_model(
        str(model_dir), Settings(device="cpu", mixed_precision="bf16", quantized=True)
    )
    int8 = [m for m in served.model.modules() if isinstance(m, Int8Linear)]
    assert {c.dtype for c in served.layout} == {"int8"}  # every linear, the tied head included
    logits, _ = served.model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16  # int8 weights, bf16 activations
    assert sum(c.modules for c in served.layout if c.dtype == "int8") == len(int8)
    for choice in served.layout:
        if choice.dtype == "int8":
            assert {m.bag_rows for m in int8
                    if (m.out_features, m.in_features) == choice.shape} == {choice.bag_rows}


def test_mixed_precision_setting_sets_the_weight_dtype(model_dir: Path) -> None:
    auto = load_serving_model(str(model_dir), Settings(device="cpu"))
    assert auto.model.tok_emb.weight.dtype == torch.float32  # auto is fp32 on CPU
    bf16 = load_serving_model(str(model_dir), Settings(device="cpu", mixed_precision="bf16"))
    assert bf16.model.tok_emb.weight.dtype == torch.bfloat16


def test_seed_style_boolean_precision_values_are_accepted() -> None:
    assert Settings(mixed_precision="true").mixed_precision == "auto"
    assert Settings(mixed_precision="false").mixed_precision == "fp32"
    with pytest.raises(ValidationError, match="mixed_precision"):
        Settings(mixed_precision="fast")


def test_kv_cache_off_is_refused_with_a_reason(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="KV cache"):
        load_serving_model(str(model_dir), Settings(device="cpu", kv_cache=False))


def test_a_model_with_the_same_linears_keeps_the_serving_models_layout(
    model_dir: Path, tmp_path: Path
) -> None:
    served = load_serving_model(str(model_dir), Settings(device="cpu"))
    assert served.layout and sum(c.modules for c in served.layout) > 0
    stamped = [ShapeChoice(c.shape, c.modules, "blas-col", {"blas-col": 1.0})
               for c in served.layout]  # fmt: skip
    retrained = Transformer(served.model.config)  # same architecture, other weights
    again = save_model_dir(tmp_path / "v2", retrained, served.tokenizer)

    swapped = load_serving_model(str(again), Settings(device="cpu"), layout=stamped)

    assert swapped.layout == stamped
    kernels = {m.one_row_kernel for m in swapped.model.modules() if isinstance(m, Linear)}
    assert kernels == {"blas"}


def test_a_device_this_machine_lacks_is_a_load_error_that_cannot_fix_itself() -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last, on any machine
    with pytest.raises(FatalLoadError, match=f"LLM_DEVICE={missing}") as caught:
        pick_device(missing)
    assert cannot_fix_itself("models:/llm@production", caught.value)
    assert pick_device("cpu") == torch.device("cpu")


def test_a_config_json_saved_as_utf16_stops_the_worker_naming_the_file(
    tmp_path: Path, model_dir: Path
) -> None:
    """It raised UnicodeDecodeError, naming no file, and the worker retried it forever."""
    copy = shutil.copytree(model_dir, tmp_path / "model")
    config = copy / "config.json"
    config.write_bytes(config.read_text().encode("utf-16"))  # as an editor may save it
    with pytest.raises(CheckpointError, match=re.escape(str(config))) as caught:
        load_serving_model(str(copy), Settings(device="cpu"))
    assert cannot_fix_itself(str(copy), caught.value)


REGISTRY = "models:/llm@production"


@pytest.mark.parametrize(
    ("uri", "error", "fatal"),
    [
        ("/models/llm", ModelNotFoundError("model path /models/llm does not exist"), True),
        ("/models/llm", TrackingError("unsupported model URI 's3://b/m'"), True),
        ("/models/llm", CheckpointError("model.safetensors: bad header"), True),
        (REGISTRY, CheckpointError("model.safetensors: bad header"), True),
        (REGISTRY, ConfigError("n_head must divide n_embd"), True),
        (REGISTRY, FatalLoadError("LLM_KV_CACHE=false"), True),
        (REGISTRY, ModelNotFoundError("models:/llm@production not found"), False),
        ("models:/llm/v1", InvalidModelUriError("a version is a positive integer"), True),
        (REGISTRY, TrackingError("MLflow at http://mlflow unreachable"), False),
        ("runs:/abc/model", TrackingError("MLflow at http://mlflow unreachable"), False),
        ("/models/llm", CheckpointError("republished twice while read; load it again"), False),
        (REGISTRY, OSError("connection reset"), False),
    ],
    ids=repr,
)
def test_only_load_errors_that_cannot_fix_themselves_stop_the_worker(
    uri: str, error: Exception, fatal: bool
) -> None:
    assert cannot_fix_itself(uri, error) is fatal
