"""The job contract between API and worker: the request, the record in Redis, and its statuses.

Plain data and conversions to and from a Redis hash; it must not talk to Redis itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
)

MAX_STOP_STRINGS = 4  # lmcore.sampling.MAX_STOP_STRINGS (not imported: it pulls in torch)
MAX_SEED = 2**53 - 1  # exact in every JSON parser (JavaScript numbers included)


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


def _as_text(value: Any) -> Any:
    """Lone surrogates are valid JSON escapes but not text (the tokenizer would choke on them):
    each becomes U+FFFD, as a lossy UTF-8 decoder would do. Runs before str validation, which
    refuses them where a length limit is set; anything but a str is left to it."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _json_number(value: Any) -> Any:
    # Lax pydantic would turn true into 1 and "5" into 5; a JSON API should not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    return value


Text = Annotated[str, BeforeValidator(_as_text)]
Int = Annotated[int, BeforeValidator(_json_number)]
Float = Annotated[float, BeforeValidator(_json_number)]
StopString = Annotated[Text, StringConstraints(min_length=1, max_length=256)]


class JobRequest(BaseModel):
    """A generation job: the prompt and lmcore's SamplingParams fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text = Field("", description="Text to continue; empty starts from end-of-text.")
    max_new_tokens: Int = Field(64, ge=1, description="At most LLM_MAX_NEW_TOKENS.")
    temperature: Float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_k: Int = Field(0, ge=0, description="0 means off.")
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    # Bounds before the validator, or the JSON schema shows them as unknown "ge"/"le" keys.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_json_number)] | None = Field(
        None, description="Same prompt + seed + model = same text (random when left out)."
    )
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    eos: StrictBool = Field(True, description="Finish at the end-of-text token.")
    truncate: Literal["error", "left"] = Field(
        "error", description="'left' drops the prompt's oldest tokens to fit the context."
    )

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for lmcore.generate.SamplingParams."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": tuple(self.stop),
            "eos": self.eos,
        }


class ModelRef(BaseModel):
    """The model version that answered a job."""

    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    uri: str | None = None


# The record's hash field naming its Idempotency-Key binding (llm:idem:...), if it has one: the
# scripts that restart the record's TTL restart the binding's with it. Not part of JobRecord
# (the API never shows it).
IDEMPOTENCY_FIELD = "idempotency"

# Hash fields that hold numbers; everything else is a string (request is JSON).
_FLOATS = ("created_at", "started_at", "first_token_at", "finished_at", "engine_s")
_INTS = ("completion_tokens", "prompt_tokens", "attempts")


class JobRecord(BaseModel):
    """What `llm:job:{id}` holds. Timestamps are Unix seconds (wall clock, any host)."""

    id: str
    status: JobStatus
    request: JobRequest
    created_at: float
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    engine_s: float | None = None  # submit-to-result inside the worker's engine
    text: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    model: ModelRef | None = None
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False

    @classmethod
    def new(cls, job_id: str, request: JobRequest) -> JobRecord:
        return cls(id=job_id, status=JobStatus.queued, request=request, created_at=time.time())

    def to_hash(self) -> dict[str, str]:
        out: dict[str, str] = {
            "id": self.id,
            "status": self.status.value,
            "request": self.request.model_dump_json(),
            "attempts": str(self.attempts),
        }
        for name in (*_FLOATS, *_INTS, "text", "finish_reason", "error", "worker"):
            value = getattr(self, name)
            if value is not None and name not in out:
                out[name] = repr(value) if isinstance(value, float) else str(value)
        if self.model is not None:
            out.update(model_fields(self.model))
        if self.cancel_requested:
            out["cancel_requested"] = "1"
        return out

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> JobRecord:
        model = ModelRef(
            name=data.get("model_name"),
            version=data.get("model_version"),
            run_id=data.get("model_run_id"),
            uri=data.get("model_uri"),
        )
        fields: dict[str, Any] = {
            "id": data["id"],
            "status": data["status"],
            "request": JobRequest.model_validate_json(data["request"]),
            "text": data.get("text"),
            "finish_reason": data.get("finish_reason"),
            "error": data.get("error"),
            "worker": data.get("worker"),
            "model": model if model.name or model.version or model.uri else None,
            "cancel_requested": data.get("cancel_requested") == "1",
        }
        for name in _FLOATS:
            fields[name] = float(data[name]) if data.get(name) else None
        for name in _INTS:
            fields[name] = int(data[name]) if data.get(name) else None
        fields["attempts"] = fields["attempts"] or 0
        return cls.model_validate(fields)


def model_fields(model: ModelRef) -> dict[str, str]:
    """The record's flat model_* hash fields."""
    pairs = {
        "model_name": model.name,
        "model_version": model.version,
        "model_run_id": model.run_id,
        "model_uri": model.uri,
    }
    return {k: str(v) for k, v in pairs.items() if v is not None}


def fingerprint(request: JobRequest) -> str:
    """A stable digest of a request's meaning (for Idempotency-Key payload checks)."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
