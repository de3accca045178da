"""One pydantic-settings class for the API, the worker and the local stack (env prefix `LLM_`).

Defaults work on a laptop; it must not open connections or import anything heavy.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.serve_values import serve_device, serve_precision

API_KEY_CHARACTERS = re.compile(r"[\x20-\x7e]+")  # printable ASCII and the space
# Redis takes whole milliseconds (a lease under 1 ms becomes PX 0, which it refuses) and the
# streamer renews at a third of the TTL from flushes 20 ms apart: a second leaves ~15 flushes.
MIN_LEASE_TTL_S = 1.0
# A decode step takes milliseconds and a long prefill seconds: a bound under a second would take
# ordinary steps for a hung engine (and restart the worker in a loop). 0 or NaN would be no bound.
MIN_ENGINE_STALL_S = 1.0


class Settings(BaseSettings):
    # Errors name the field and the rule, never the value: API keys and the Redis password (in
    # redis_url) are secrets, and these errors end up in logs.
    model_config = SettingsConfigDict(
        env_prefix="LLM_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    redis_url: str = "redis://localhost:6379/0"
    # Put into redis_url URL-encoded, so it may hold any character ('/', '#', '@', '%', ...):
    # written into the URL by hand, such a password broke the URL or named another host.
    redis_password: str | None = None
    # The API's Redis connections: a burst over this many commands in flight waits for a free one
    # (up to redis_pool_timeout_s, then 503) instead of failing at once.
    redis_max_connections: int = Field(100, ge=2)
    redis_pool_timeout_s: float = Field(5.0, gt=0)
    # The API refuses new jobs (503, Retry-After) once Redis's used_memory reaches this fraction
    # of its maxmemory (under noeviction; no maxmemory: never). At the cap Redis refuses every
    # client's writes, the workers' too: they could then neither take a queued job (its message
    # was lost), nor beat, nor record a result. The rest is their room to finish what is queued.
    redis_memory_watermark: float = 0.9
    model_uri: str = "models:/llm@production"
    # MLflow's own variable, so one export serves the trainer, the CLI and the worker.
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "LLM_MLFLOW_TRACKING_URI"),
    )
    # Comma-separated; empty means the job endpoints need no key.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    # The API's own log lines (`services.*`; any case). uvicorn's lines follow its --log-level,
    # the worker's Celery's --loglevel.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Request bounds.
    max_new_tokens: int = Field(256, ge=1)
    max_prompt_chars: int = Field(16_384, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    sync_timeout_s: float = Field(60.0, gt=0)  # the seed's synchronous endpoints

    # Job lifetime and Celery delivery.
    job_ttl_s: int = Field(86_400, ge=60)
    job_time_limit_s: float = Field(600.0, gt=0)  # hard limit of one job's generation
    visibility_timeout_s: int = Field(3_600, ge=1)  # redelivery of unacked jobs after this
    lease_ttl_s: float = 10.0  # a running job's owner renews this; expiry = dead

    # Worker.
    max_batch: int = Field(8, ge=1)
    worker_concurrency: int | None = Field(None, ge=1)  # Celery threads; default 2 x max_batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    model_poll_s: float = Field(30.0, gt=0)  # how often the worker checks the alias (hot swap)
    model_cache_dir: str | None = None
    heartbeat_s: float = Field(5.0, gt=0)
    # A worker whose engine has work but finishes no step for this long (a hung kernel or device,
    # a deadlock) counts as dead: it drops its heartbeat, hands its jobs back and exits. The
    # slowest real steps are far shorter: a prefill of 8 x 1,000 tokens of gpt2-124m on 2 CPU
    # threads takes ~7 s, and compiling its decode step ~16 s on an H200 (bench/lmcore_gpu.json),
    # which the warm-up does before the bound applies; only a hot swap to other shapes compiles
    # inside a step. 300 s is 10x more than either and half LLM_JOB_TIME_LIMIT_S.
    engine_stall_s: float = 300.0
    # CUDA graphs for the engine's decode step: auto = on a GPU. On an H200 the compiled engine
    # served 32 requests ~3x faster than eager; the worker compiles before taking jobs.
    compile_decode: str = "auto"  # auto | true | false

    # The seed's inference keys (config/serve/default.yaml documents them).
    kv_cache: bool = True  # the engine decodes from its static cache; false is refused
    quantized: bool = False  # int8 weight-only linear layers (lmcore.quantize)
    mixed_precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _check_precision(cls, value: object) -> object:
        return serve_precision(value)  # the seed's booleans too: true = auto, false = fp32

    @field_validator("lease_ttl_s")
    @classmethod
    def _check_lease(cls, value: float) -> float:
        if not value >= MIN_LEASE_TTL_S:  # NaN too
            raise ValueError(f"LLM_LEASE_TTL_S must be at least {MIN_LEASE_TTL_S:g} s, got {value}")
        return value

    @field_validator("redis_memory_watermark")
    @classmethod
    def _check_watermark(cls, value: float) -> float:
        if not 0 < value <= 1:  # NaN too
            raise ValueError("LLM_REDIS_MEMORY_WATERMARK must be above 0 and at most 1 (a "
                             f"fraction of Redis's maxmemory), got {value}")  # fmt: skip
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("engine_stall_s")
    @classmethod
    def _check_stall(cls, value: float) -> float:
        if not value >= MIN_ENGINE_STALL_S:  # NaN too
            raise ValueError(f"LLM_ENGINE_STALL_S must be at least {MIN_ENGINE_STALL_S:g} s, "
                             f"got {value}")  # fmt: skip
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _check_device(cls, value: object) -> object:
        return serve_device(value, "LLM_DEVICE")

    @field_validator("compile_decode", mode="before")
    @classmethod
    def _check_compile(cls, value: object) -> object:
        value = str(value).lower()
        if value not in ("auto", "true", "false"):
            raise ValueError("compile_decode must be auto, true or false")
        return value

    def decode_compiled_on(self, device_type: str) -> bool:
        """Whether the engine compiles its decode step on this kind of device."""
        if self.compile_decode == "auto":
            return device_type == "cuda"
        return self.compile_decode == "true"

    @model_validator(mode="before")
    @classmethod
    def _password_into_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("redis_password"):
            url = data.get("redis_url") or cls.model_fields["redis_url"].default
            data = {**data, "redis_url": with_password(url, data["redis_password"])}
        return data

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = tuple(k.strip() for k in value.split(",") if k.strip())
            # Only an empty value means "no keys": one of separators and blanks is a mistake
            # (a Secret written wrong), and taking it as "no keys" would open the API.
            if value.strip() and not keys:
                raise ValueError(f"LLM_API_KEYS holds no key ({value!r}); unset it or leave it "
                                 "empty to run without keys")  # fmt: skip
            value = keys
        for number, key in enumerate(value if isinstance(value, tuple | list) else (), 1):
            # HTTP header values travel as bytes that servers read as latin-1, and clients send a
            # non-ASCII key as UTF-8: such a key could never match. The key itself is not echoed.
            if isinstance(key, str) and not API_KEY_CHARACTERS.fullmatch(key):
                raise ValueError(
                    f"LLM_API_KEYS: key {number} holds a control or a non-ASCII character, "
                    "which would never match the key a client sends; use printable ASCII "
                    "(e.g. `openssl rand -hex 32`)"
                )
        return value

    @model_validator(mode="after")
    def _check_delivery(self) -> Settings:
        # A job still running when its visibility timeout ends would be delivered a second time.
        if self.visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                f"job_time_limit_s ({self.job_time_limit_s})"
            )
        # The record's TTL restarts when a worker claims the job. A worker that dies running it
        # (SIGKILL, OOM) leaves its message unacked, and it is delivered again only after the
        # visibility timeout: the record must still be there then, with one time limit to spare
        # for that delivery to be taken. A shorter TTL let the record expire first: the client
        # saw `running` then 404, and the redelivery found no record and dropped the job.
        if self.job_ttl_s <= self.visibility_timeout_s + self.job_time_limit_s:
            raise ValueError(
                f"job_ttl_s ({self.job_ttl_s}) must exceed visibility_timeout_s + "
                f"job_time_limit_s ({self.visibility_timeout_s} + {self.job_time_limit_s:g}): "
                "a job whose worker died is delivered again only after the visibility timeout, "
                "and its record must outlive that (LLM_JOB_TTL_S, LLM_VISIBILITY_TIMEOUT_S, "
                "LLM_JOB_TIME_LIMIT_S)"
            )
        return self

    @property
    def concurrency(self) -> int:
        return self.worker_concurrency or 2 * self.max_batch

    @property
    def heartbeat_ttl_s(self) -> int:
        return max(2, int(3 * self.heartbeat_s))


def with_password(url: str, password: str) -> str:
    """`url` with `password` URL-encoded in place of any password it had (its user kept)."""
    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
