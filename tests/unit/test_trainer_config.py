"""config/ + services/trainer: composition, the seed's keys, one-line errors, the service's run."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lmcore.config import PRESETS, ConfigError, ModelConfig
from lmcore.data import prepare_corpus
from lmcore.train import TrainConfig, normalize_precision
from services.trainer import schema
from services.trainer.__main__ import main
from tests.helpers.trainer_run import write_corpus

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SEED_KEYS = {  # every key of the seed's config.yaml, by section
    "model": ["n_layers", "n_heads", "n_embd", "max_length"],
    "training": ["batch_size", "lr", "epochs", "mixed_precision", "train_ratio", "val_ratio"],
    "inference": ["kv_cache", "quantized", "mixed_precision", "model_path"],
}


def test_model_group_files_are_the_lmcore_presets() -> None:
    assert {p.stem for p in (REPO / "config" / "model").glob("*.yaml")} == set(PRESETS)
    for name, preset in PRESETS.items():
        cfg = schema.compose([f"model={name}"])
        assert cfg.model.name == name
        assert schema.model_config(cfg) == preset


# Fields the schema has and lmcore's dataclass has not, each with why.
MODEL_SCHEMA_ONLY = {"name": "the preset's name (config/model/<name>.yaml); model_config drops it"}


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default, a default_factory called, so two classes compare by value."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        out[f.name] = f.default if factory is dataclasses.MISSING else factory()
    return out


def test_train_schema_mirrors_train_config() -> None:
    """A TrainConfig field missing from TrainSchema is refused as an unknown key by Hydra/lmctl;
    one only in the schema fails TrainConfig.from_dict; a differing default silently changes
    what a key left out means."""
    assert _defaults(schema.TrainSchema) == _defaults(TrainConfig)


def test_model_schema_mirrors_model_config() -> None:
    model = {k: v for k, v in _defaults(schema.ModelSchema).items() if k not in MODEL_SCHEMA_ONLY}
    assert model == _defaults(ModelConfig)
    assert set(MODEL_SCHEMA_ONLY) <= set(_defaults(schema.ModelSchema))


def test_every_seed_key_has_a_documented_home() -> None:
    table = (REPO / "config" / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \((\w+)\)\s*\| `([\w.]+)`", table, re.M)
    documented = {(key, section): target for key, section, target in rows}
    cfg = schema.compose([])
    for section, keys in SEED_KEYS.items():
        for key in keys:
            assert (key, section) in documented, f"{section}.{key} missing from config/README.md"
            target = documented[(key, section)]
            assert OmegaConf.select(cfg, target, default="<absent>") != "<absent>", target


def test_unknown_key_exits_non_zero_with_one_line_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer", "model=tiny", "train.bogus=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # no Hydra output dir


def test_an_unknown_key_in_a_config_file_is_named_with_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a training pod of an older image meets a newer chart's config: the line said only
    "In 'train/cpu': ConfigKeyError raised while composing config:"."""
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    with (config / "train" / "cpu.yaml").open("a") as f:
        f.write("bogus_key: 1\n")
    monkeypatch.setenv("LLM_CONFIG_DIR", str(config))
    assert main(["model=tiny"]) == 2
    assert capsys.readouterr().err == ("error: unknown config key 'train.bogus_key' in "
                                       "train/cpu.yaml (see config/README.md)\n")  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+train.bogus=1"], "'train.bogus'"),
        (["train.lr=fast"], "train.lr: Value 'fast'"),
        (["train.max_steps=1.5"], "train.max_steps"),
        (["model=huge"], "model/huge"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["train.epochs=2"], "train.epochs: set exactly one of max_steps and epochs"),
        (["data=text"], "data.source must be set"),
        (["data.val_ratio=0.5", "data.train_ratio=0.9"], "data.train_ratio + data.val_ratio"),
        (["data.prep_timeout_s=0"], "data.prep_timeout_s must be > 0"),
        (["data.prep_timeout_s=inf"], "data.prep_timeout_s must be > 0 and at most 31536000"),
        (["train.dist_timeout_s=1e300"], "train.dist_timeout_s must be > 0 and at most"),
        (["train.lr=1e400"], "train.lr must be > 0 and finite"),
        (["train.dist_timeout_s=0"], "train.dist_timeout_s must be > 0 and at most"),
        (["train.device=meta"], "train.device must be auto, cpu, cuda or cuda:N"),
        (["serve.max_batch=-1"], "serve.max_batch must be >= 1"),
        (["serve.max_new_tokens=0"], "serve.max_new_tokens must be >= 1"),
        (["serve.mixed_precision=foo"], "serve.mixed_precision must be auto"),
        (["serve.mixed_precision=yes"], "serve.mixed_precision must be auto"),
        (["serve.device=meta"], "serve.device must be auto, cpu, cuda, cuda:N or mps"),
        (["model.n_head=5"], "n_head"),
        (["trainn.lr=1"], "'trainn'"),
    ],
)
def test_bad_config_is_one_line_and_exit_code_2(
    overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err


def test_missing_corpus_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "corpus.txt"
    code = main(["model=tiny", "data=text", f"data.source={missing}", "tracking.enabled=false",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"error: data.source: {missing}: no such file or directory"


def test_a_vocab_smaller_than_the_byte_alphabet_is_a_config_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to pass validation, read the corpus, then fail in Tokenizer.train (exit 1)."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    code = main(["model=tiny", "model.vocab_size=100", "data=text", f"data.source={corpus}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.checkpoint_dir={tmp_path / 'ck'}",
                 "tracking.enabled=false", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "error: model.vocab_size must be >= 257 (256 byte tokens + eos), got 100\n"


@pytest.mark.parametrize("source", ["", " "])
def test_a_blank_data_source_is_a_config_error(source: str) -> None:
    """`data.source=` used to mean every .txt/.md file under the current directory."""
    cfg = schema.compose(["data=text", f"data.source={source}"])
    with pytest.raises(ConfigError, match="data.source must not be blank"):
        schema.validate(cfg)


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], "training token(s), need model.block_size + 1 = 129"),
    (["model.block_size=8", "data.val_ratio=0.01"], "1 validation token(s), need 2"),
])
def test_a_corpus_too_small_for_the_model_is_a_corpus_error_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str
) -> None:
    """It used to fail with exit 1 and a bare ValueError: a short training split when the
    sampler was made, a 1-token validation split only after every step had run."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=5)
    code = main(["model=tiny", "data=text", f"data.source={corpus}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.checkpoint_dir={tmp_path / 'ck'}",
                 "train.max_steps=2", "train.batch_size=2", "tracking.enabled=false",
                 "train.progress=false", "train.quantization_report=false", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: data.source: {corpus}: corpus too small: "), err
    assert expected in err[-1]
    assert not (tmp_path / "ck").exists()  # nothing trained


def test_cfg_prints_the_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cfg", "model=tiny", "train.max_steps=50"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.model.n_layer == 2 and printed.train.max_steps == 50


def test_tracking_uri_comes_from_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert schema.compose([]).tracking.uri == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert schema.compose([]).tracking.uri == "sqlite:///mlflow.db"


def test_training_length_by_steps_or_by_epochs() -> None:
    by_steps = schema.train_config(schema.compose(["train.max_steps=50"]))
    assert (by_steps.max_steps, by_steps.epochs) == (50, None)
    by_epochs = schema.train_config(schema.compose(["train.max_steps=null", "train.epochs=2"]))
    assert (by_epochs.max_steps, by_epochs.epochs) == (None, 2.0)


@pytest.mark.parametrize(("value", "expected"),
                         [("true", "auto"), ("false", "fp32"), ("bf16", "bf16")])
def test_seed_boolean_mixed_precision_is_accepted(value: str, expected: str) -> None:
    cfg = schema.compose([f"train.mixed_precision={value}"])
    assert normalize_precision(schema.train_config(cfg).mixed_precision) == expected


@pytest.mark.parametrize("value", ["BF16", "true", "false", "Auto"])
def test_serve_precisions_the_services_accept_are_accepted(value: str) -> None:
    schema.validate(schema.compose([f"serve.mixed_precision={value}", "serve.device=CUDA:1"]))


def test_the_keys_the_deployment_uses_compose() -> None:
    cfg = schema.compose([
        "model=gpt2-124m", "train=gpu", "train.max_steps=10", "train.checkpoint_dir=/ckpt",
        "train.eval_interval=5", "data.source=/data/corpus.txt", "tracking.register_name=llm-x",
    ])
    schema.validate(cfg)
    assert cfg.train.checkpoint_dir == "/ckpt" and cfg.tracking.register_name == "llm-x"
    assert cfg.model.n_layer == 12 and cfg.train.compile is True


def test_default_checkpoint_dir_is_per_model() -> None:
    assert schema.compose(["model=tiny"]).train.checkpoint_dir == "checkpoints/tiny"


class ArtifactTracker:
    def __init__(self) -> None:
        self.artifacts: dict[str, bytes] = {}
        self.ended: list[str] = []

    def start_run(self, experiment: str, run_id: str | None, params: dict[str, Any]) -> str:
        self.params = params
        return "run-art"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        self.artifacts[Path(path).name] = Path(path).read_bytes()  # read now: it is a temp file

    def log_model_dir(self, model_dir: Any, register_name: str | None,
                      alias: str = "candidate") -> Any:
        self.registered = (Path(model_dir), register_name, alias)

    def end_run(self, status: str) -> None:
        self.ended.append(status)


def test_run_logs_resolved_config_loss_curve_and_model(tmp_path: Path) -> None:
    from services.trainer import run

    corpus = write_corpus(tmp_path / "corpus.txt", lines=3000)
    prepare_corpus(corpus, tmp_path / "cache", vocab_size=512, progress=False)  # warm cache
    cfg = schema.compose([
        "model=tiny", "model.block_size=32", "data=text", f"data.source={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=4", "train.batch_size=2",
        "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=1",
        "train.device=cpu", "train.progress=false", f"train.checkpoint_dir={tmp_path / 'ck'}",
        "tracking.register_name=llm-test",
    ])
    tracker = ArtifactTracker()
    result = run(cfg, tracker=tracker)
    assert result.steps == 4 and result.run_id == "run-art"
    assert tracker.ended == ["FINISHED"]
    assert tracker.registered == (tmp_path / "ck" / "model", "llm-test", "candidate")
    logged = OmegaConf.create(tracker.artifacts["config.yaml"].decode())
    assert logged.data.source == str(corpus) and logged.train.max_steps == 4
    assert "${" not in tracker.artifacts["config.yaml"].decode()  # resolved
    assert tracker.artifacts["loss_curve.png"].startswith(b"\x89PNG")
    assert tracker.params["model"]["name"] == "tiny"
    shutil.rmtree(tmp_path / "ck")
