"""`lmctl`: train, generate, promote a model version, submit a PyTorchJob, run the local stack.

A thin typer layer over lmcore and services: heavy imports happen inside commands, and every
expected failure is one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from services.trainer import pytorchjob

EXIT_ERROR = 1
EXIT_USAGE = 2


def _click_exception() -> type[Exception] | None:
    try:
        import click
    except ImportError:
        return None
    return click.ClickException


# Typer >= 0.23 vendors click; older ones raise click's own exceptions.
_USAGE_ERRORS: tuple[type[Exception], ...] = tuple(
    cls for cls in (getattr(typer, "TyperException", None), _click_exception()) if cls
)

app = typer.Typer(
    name="lmctl",
    help="Train, generate with, promote and deploy the llm-pipeline language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CliError(Exception):
    """An expected failure: printed as `error: <message>`, exit code `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + "..."


@contextmanager
def _expected_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the library's expected exceptions into CliError (one line, no traceback)."""
    try:
        yield
    except CliError:
        raise
    except kinds as exc:
        raise CliError(_one_line(exc)) from exc


TRACKING_URI_OPTION: Any = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI")


@contextmanager
def _fail_fast_mlflow() -> Iterator[None]:
    """MLflow retries a dead server for minutes by default; an interactive command should not
    (nor draw download progress bars over its one line of output).

    Set only for the command (main() also runs in-process, e.g. in tests); explicit settings win.
    """
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# -- train --------------------------------------------------------------------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Train with Hydra overrides, e.g. `lmctl train model=tiny train.max_steps=50`.",
)
def train(
    overrides: Optional[list[str]] = typer.Argument(None, help="Hydra overrides (key=value)."),
    nproc_per_node: int = typer.Option(
        1, "--nproc-per-node", min=1, help="Processes (GPUs) on this machine; >1 runs torchrun."
    ),
) -> None:
    args = list(overrides or [])
    if nproc_per_node > 1:
        if not {"-h", "--help"} & set(args):
            # Once here, not as a torchrun traceback around every rank's one line.
            _validate_overrides([a for a in args if a != "--cfg"])
        cmd = [sys.executable, "-c", _TORCHRUN, "--standalone",
               f"--nproc-per-node={nproc_per_node}", "-m", "services.trainer", *args]  # fmt: skip
        raise typer.Exit(_run_in_charge(cmd))
    from services.trainer.__main__ import main as trainer_main

    raise typer.Exit(trainer_main(args))


# torchrun, exiting as the trainer does instead of with a traceback: 128 + the signal that
# stopped it (after its ranks have stopped), or the first failed rank's exit code.
_TORCHRUN = """\
import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main()
except SignalException as exc:
    sys.exit(128 + int(exc.sigval))
except ChildFailedError as exc:
    code = exc.get_first_failure()[1].exitcode
    sys.exit(code if code > 0 else 128 - code if code < 0 else 1)
"""
# What torchrun turns into a shutdown of its ranks (TORCHELASTIC_SIGNALS_TO_HANDLE's default).
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _run_in_charge(cmd: list[str]) -> int:
    """Run cmd (torchrun) until it exits, passing it the first SIGTERM, SIGINT, SIGHUP or
    SIGQUIT; its exit code, 128 + N for death by signal N.

    The child gets its own process group, so a terminal's Ctrl-C reaches it once, through us:
    a second signal would cut short torchrun's wait for its ranks to checkpoint and exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return _exit_code(subprocess.call(cmd))  # no handlers off the main thread
    proc: subprocess.Popen[bytes] | None = None
    received: list[int] = []
    forwarded = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal forwarded
        if received:
            return
        received.append(signum)
        if proc is not None:
            forwarded = True
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, process_group=0)
        if received and not forwarded:  # it came before the child existed
            forwarded = True
            proc.send_signal(received[0])
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _exit_code(code)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


# -- generate -----------------------------------------------------------------------------------


@app.command(help="Generate text from a model: a local model dir, models:/NAME@ALIAS, runs:/...")
def generate(
    prompt: str = typer.Argument("", help="The prompt (empty: start from end-of-text)."),
    model: str = typer.Option(
        ..., "--model", "-m", envvar="LLM_MODEL_URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model dir.",
    ),  # fmt: skip
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="Print the prompt before the text."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="LLM_MODEL_CACHE_DIR"),
    kv_cache: bool = typer.Option(
        True, "--kv-cache/--no-kv-cache",
        help="Decode from the static KV cache (the seed's kv_cache).",
    ),
    quantized: bool = typer.Option(False, "--quantized", help="int8 weight-only linear layers."),
    mixed_precision: str = typer.Option(
        "auto", "--mixed-precision",
        help="auto | bf16 | fp16 | fp32 (auto: fp32 on CPU), any case; the seed's true = auto, "
        "false = fp32.",
    ),  # fmt: skip
    truncate: str = typer.Option(
        "error", "--truncate", help="error | left (drop the prompt's oldest tokens to fit)."
    ),
) -> None:
    sampling = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "seed": seed, "truncate": truncate}  # fmt: skip
    _check_as_the_api_would(sampling)
    device, mixed_precision = _serve_values(device, mixed_precision)
    import torch

    from lmcore.checkpoint import CheckpointError, load_model_dir
    from lmcore.generate import ContextLengthError, NonFiniteLogitsError, SamplingParams
    from lmcore.generate import generate as run_generate
    from lmcore.mlflow_client import TrackingError
    from lmcore.model_uri import resolve_model_uri
    from lmcore.precision import inference_dtype, resolve_precision

    expected = (ValueError, TrackingError, CheckpointError, OSError, RuntimeError,
                NonFiniteLogitsError)  # fmt: skip
    with _fail_fast_mlflow(), _expected_errors(*expected):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise CliError(f"--device {device}: no CUDA device here (use --device cpu or auto)")
        elif device == "mps" and not torch.backends.mps.is_available():
            raise CliError("--device mps: no MPS device here (use --device cpu or auto)")
        # Only then the model (an MLflow download, maybe): a bad option fails before it.
        resolved = resolve_model_uri(model, cache_dir=cache_dir, tracking_uri=tracking_uri)
        dtype = inference_dtype(resolve_precision(mixed_precision, device))
        loaded = load_model_dir(resolved.path, device=device, dtype=dtype, quantized=quantized)
        if loaded.tokenizer is None:
            raise CliError(f"{resolved.path} has no tokenizer.json; cannot generate text")
        try:
            [out] = run_generate(loaded.model, loaded.tokenizer, [prompt], params,
                                 truncate=truncate, use_cache=kv_cache)  # fmt: skip
        except ContextLengthError as exc:  # the library names its argument, not our option
            raise CliError(str(exc).replace("truncate='left'", "--truncate left")) from exc
    typer.echo((prompt if echo else "") + out.text)


def _serve_values(device: str, mixed_precision: str) -> tuple[str, str]:
    """--device and --mixed-precision by the rules the worker's settings follow
    (services.common.serve_values): any case, the seed's true / false precisions; a usage error
    (exit 2) before any model is resolved."""
    from services.common.serve_values import serve_device, serve_precision

    try:
        precision = serve_precision(mixed_precision, "--mixed-precision")
        return serve_device(device, "--device"), precision
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _check_as_the_api_would(sampling: dict[str, Any]) -> None:
    """The API's bounds (services.common.jobs.JobRequest), so a seed or temperature lmctl takes
    is one a job takes too, with the same text: seeds wrap mod 2**64, so -1 would repeat one."""
    from pydantic import ValidationError

    from services.common.jobs import JobRequest

    try:
        JobRequest(**sampling)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise CliError("; ".join(problems), EXIT_USAGE) from None


# -- promote ------------------------------------------------------------------------------------


@app.command(help="Point an alias (default: production) at a registered model version.")
def promote(
    version: str = typer.Option(..., "--version", "-v", help="The model version number."),
    name: str = typer.Option("llm", "--name", help="The registered model name."),
    alias: str = typer.Option("production", "--alias"),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
) -> None:
    from lmcore import registry
    from lmcore.mlflow_client import TrackingError

    with _fail_fast_mlflow(), _expected_errors(TrackingError):
        registry.promote(name, version, alias, tracking_uri=tracking_uri)
    typer.echo(f"{name}@{alias} -> version {version}")


# -- submit-training ----------------------------------------------------------------------------


@contextmanager
def _job_errors(code: int = EXIT_ERROR) -> Iterator[None]:
    """The PyTorchJob library's refusals as CliError, their message as written."""
    try:
        yield
    except pytorchjob.JobSpecError as exc:
        raise CliError(str(exc), code) from exc


def _validate_overrides(overrides: Sequence[str]) -> None:
    """Compose the trainer's config here, so a typo fails now rather than in the cluster."""
    try:
        from services.trainer import errors, schema
    except ImportError:
        return  # the trainer's extras (Hydra) are not installed: the cluster will check
    try:
        schema.validate(schema.compose(list(overrides)))
    except Exception as exc:
        if not errors.is_config_error(exc):
            raise
        raise CliError(f"bad training config: {errors.one_line(exc)}", EXIT_USAGE) from exc


@app.command(
    "submit-training",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Build a PyTorchJob from the config and submit it to the current kube context.",
)
def submit_training(
    overrides: Optional[list[str]] = typer.Argument(None, help="Hydra overrides for the trainer."),
    image: Optional[str] = typer.Option(None, "--image", help="Trainer image (default: manifest)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Worker pods besides the Master."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="GPUs per pod."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n"),
    name: Optional[str] = typer.Option(None, "--name", help="The PyTorchJob's name."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri",
        help=f"MLflow as pods see it (default {pytorchjob.DEFAULT_CLUSTER_MLFLOW}).",
    ),  # fmt: skip
    context: Optional[str] = typer.Option(None, "--context", help="Default: the current context."),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the job as YAML; submit nothing."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check overrides first."),
) -> None:
    overrides = list(overrides or [])
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise CliError(f"unknown option {bad[0]!r}", EXIT_USAGE)
    if tracking_uri:  # before the slower override checks
        with _job_errors(EXIT_USAGE):
            pytorchjob.tracking_uri_without_credentials(tracking_uri)
    if validate:
        _validate_overrides(overrides)
    job = pytorchjob.build_pytorchjob(overrides, image=image, workers=workers,
                                      nproc_per_node=nproc_per_node, namespace=namespace,
                                      name=name, tracking_uri=tracking_uri)  # fmt: skip
    with _expected_errors(ValueError, ImportError):
        sdk_job = pytorchjob.to_sdk_job(job)
    if dry_run:  # shown, never with credentials (the template's plain values included)
        with _expected_errors(ValueError, ImportError):
            shown = pytorchjob.to_sdk_job(pytorchjob.redacted_job(job))
        typer.echo(pytorchjob.sdk_job_yaml(shown), nl=False)
        return
    namespace = job["metadata"]["namespace"]
    created = _submit(sdk_job, job, namespace, context, kubeconfig)
    for claim in created:
        typer.echo(f"created PersistentVolumeClaim {namespace}/{claim}")
    typer.echo(f"submitted PyTorchJob {namespace}/{job['metadata']['name']}")


def _submit(sdk_job: Any, job: dict[str, Any], namespace: str, context: str | None,
            kubeconfig: Path | None) -> list[str]:  # fmt: skip
    """Create the claims the job needs, then the job; returns the claims created."""
    try:
        from kubeflow.training import TrainingClient
        from kubernetes.config import ConfigException
    except ImportError as exc:
        raise CliError(f"{exc} (install the CLI extras: pip install 'llm-pipeline[cli]')") from exc
    try:
        client = TrainingClient(config_file=str(kubeconfig) if kubeconfig else None,
                                context=context, namespace=namespace)  # fmt: skip
    except (ConfigException, OSError, TypeError) as exc:
        raise CliError(f"no usable Kubernetes context ({_one_line(exc)}); "
                       "use --dry-run to print the job instead") from exc  # fmt: skip
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError  # the kubernetes client's transport

    expected = (RuntimeError, TimeoutError, ValueError, OSError, ApiException)
    try:
        with _job_errors(), _expected_errors(*expected):
            known = pytorchjob.load_job_claims()
            created = pytorchjob.ensure_claims(client.core_api, job, namespace, known)
            client.create_job(job=sdk_job, namespace=namespace)
    except HTTPError as exc:  # MaxRetryError and the like: no OSError
        reason = getattr(exc, "reason", None) or exc
        raise CliError(f"cannot reach the Kubernetes API server ({_one_line(reason)}); "
                       "use --dry-run to print the job instead") from exc  # fmt: skip
    return created


# -- stack (optional) ---------------------------------------------------------------------------


def _add_stack(root: typer.Typer) -> None:
    """`lmctl stack up|down` from services.stack, when that module exists."""
    try:
        from services.stack import stack_app
    except ModuleNotFoundError as exc:
        if exc.name == "services.stack":
            return
        _add_broken_stack(root, exc)
        return
    except Exception as exc:  # present but broken: say so when used, not on every command
        _add_broken_stack(root, exc)
        return
    root.add_typer(stack_app, name="stack", help="Run the local stack (Redis, MLflow, API, worker)")


def _add_broken_stack(root: typer.Typer, exc: BaseException) -> None:
    message = f"lmctl stack unavailable: {_one_line(exc)}"

    @root.command("stack", help="Run the local stack (unavailable here).",
                  context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def stack() -> None:  # pragma: no cover - only when services.stack fails to import
        raise CliError(message)


_add_stack(app)


# -- entry point --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The `lmctl` console script: returns the exit code instead of raising SystemExit."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    try:
        result = app(args=args, prog_name="lmctl", standalone_mode=False)
    except CliError as exc:
        return _error(str(exc), exc.code)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        return _error("interrupted", 130)
    except _USAGE_ERRORS as exc:  # bad options, missing arguments, unknown commands
        return _error(exc.format_message(), getattr(exc, "exit_code", EXIT_USAGE))
    return result if isinstance(result, int) else 0


def _error(message: str, code: int) -> int:
    one_line = re.sub(r"\s+", " ", message).strip()
    print(f"error: {one_line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
