"""Pydantic models for every request and response body of the HTTP API.

Request models whose bounds depend on settings are built per app by `job_request_model` and
`legacy_request_models`; this module must not touch Redis or Celery.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from services.common.jobs import Int, JobRecord, JobRequest, JobStatus, ModelRef, Text
from services.common.settings import Settings

LEGACY_DEFAULT_PROMPT = "First Citizen:"  # what the seed's prompt-less endpoint started from


def job_request_model(settings: Settings) -> type[JobRequest]:
    """JobRequest with this deployment's limits in the schema (so /docs and 422s agree)."""
    return create_model(
        "JobRequest",
        __base__=JobRequest,
        prompt=(
            Text,
            Field("", max_length=settings.max_prompt_chars,
                  description="Text to continue; empty starts from end-of-text."),
        ),
        max_new_tokens=(
            Int,
            Field(min(64, settings.max_new_tokens), ge=1, le=settings.max_new_tokens,
                  description="Tokens to generate at most."),
        ),
    )


class _TextGenerationBase(BaseModel):
    prompt: str
    num_of_token_generated: int


class _TextGenerationWithoutPromptBase(BaseModel):
    num_of_token_generated: int


def legacy_request_models(
    settings: Settings,
) -> tuple[type[_TextGenerationBase], type[_TextGenerationWithoutPromptBase]]:
    tokens = (Int, Field(..., ge=1, le=settings.max_new_tokens))
    with_prompt = create_model(
        "TextGenerationRequest",
        __base__=_TextGenerationBase,
        prompt=(Text, Field(..., max_length=settings.max_prompt_chars)),
        num_of_token_generated=tokens,
    )
    without_prompt = create_model(
        "TextGenerationWithoutPromptRequest",
        __base__=_TextGenerationWithoutPromptBase,
        num_of_token_generated=tokens,
    )
    return with_prompt, without_prompt


class TextGenerationResponse(BaseModel):
    """The seed's answer: generated_text holds the prompt followed by the continuation."""

    generated_text: str
    prompt: str
    num_of_token_generated: int


class TextGenerationWithoutPromptResponse(BaseModel):
    generated_text: str
    num_of_token_generated: int


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str

    @classmethod
    def for_job(cls, job_id: str) -> JobLinks:
        return cls(
            self=f"/jobs/{job_id}",
            events=f"/jobs/{job_id}/events",
            cancel=f"/jobs/{job_id}/cancel",
        )


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    links: JobLinks


class JobResult(BaseModel):
    text: str
    completion_tokens: int
    prompt_tokens: int | None = None
    finish_reason: str | None = Field(None, description="length | stop | eos | cancelled")


class JobTimings(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queued_s: float | None = Field(None, description="Submission to a worker picking it up.")
    time_to_first_token_s: float | None = Field(None, description="Submission to first token.")
    total_s: float | None = Field(None, description="Submission to the final status.")
    engine_s: float | None = Field(None, description="Time inside the worker's engine.")
    tokens_per_s: float | None = Field(None, description="Generated tokens / running time.")


class JobView(BaseModel):
    id: str
    status: JobStatus
    request: JobRequest
    result: JobResult | None = None
    error: str | None = None
    timings: JobTimings
    model: ModelRef | None = None
    attempts: int = 0
    links: JobLinks

    @classmethod
    def from_record(cls, rec: JobRecord) -> JobView:
        result = None
        if (rec.status.final and rec.status != JobStatus.failed) or rec.text:
            result = JobResult(
                text=rec.text or "",
                completion_tokens=rec.completion_tokens or 0,
                prompt_tokens=rec.prompt_tokens,
                finish_reason=rec.finish_reason,
            )
        return cls(
            id=rec.id,
            status=rec.status,
            request=rec.request,
            result=result,
            error=rec.error,
            timings=_timings(rec),
            model=rec.model,
            attempts=rec.attempts,
            links=JobLinks.for_job(rec.id),
        )


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def _since(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else round(max(end - start, 0.0), 6)


def _timings(rec: JobRecord) -> JobTimings:
    running = _since(rec.finished_at, rec.started_at)
    tps = None
    if running and rec.completion_tokens:
        tps = round(rec.completion_tokens / running, 3)
    return JobTimings(
        created_at=_ts(rec.created_at),
        started_at=_ts(rec.started_at),
        finished_at=_ts(rec.finished_at),
        queued_s=_since(rec.started_at, rec.created_at),
        time_to_first_token_s=_since(rec.first_token_at, rec.created_at),
        total_s=_since(rec.finished_at, rec.created_at),
        engine_s=rec.engine_s,
        tokens_per_s=tps,
    )


class Detail(BaseModel):
    """An error body: a message a person can act on."""

    model_config = ConfigDict(extra="allow")

    detail: str


class TimeoutDetail(BaseModel):
    """A seed endpoint's timeout, or Redis lost while it waited: the job goes on; poll its links."""

    detail: str
    job_id: str
    links: JobLinks


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    redis: bool
    workers: int
    model: dict[str, Any] | None = None
