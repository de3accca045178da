"""The seed's synchronous endpoints, kept for its users: submit a job, wait, answer as before.

On timeout the job goes on: 504 with its id and links, so the client can poll. Redis failing
during the wait is a 503 that names the job too: it is saved and will run, and a client that
resubmitted instead of polling would run it twice (these endpoints take no Idempotency-Key).
A client that disconnects while it waits never learns the job's id, so nobody would read its
result: the job is cancelled (a queued one never runs, a running one stops at its next step).
"""

# No `from __future__ import annotations`: FastAPI must see the per-app request model objects.

import asyncio
import logging
from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from services.api import auth, deps
from services.api.errors import RETRY_AFTER_S
from services.api.events import EventHub
from services.api.model_limits import ModelLimitsCache
from services.api.schemas import (
    LEGACY_DEFAULT_PROMPT,
    Detail,
    JobLinks,
    TextGenerationResponse,
    TextGenerationWithoutPromptResponse,
    TimeoutDetail,
    legacy_request_models,
)
from services.api.store import JobStore
from services.api.submit import submit_job
from services.common.jobs import JobRecord, JobRequest, JobStatus
from services.common.settings import Settings

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5  # how often a waiting handler checks that its client is still there
CLIENT_GONE = 499  # nginx's "client closed request"; nobody reads it, /metrics counts it

LOCS = {
    "prompt": ("body", "prompt"),
    "max_new_tokens": ("body", "num_of_token_generated"),
}


def poll_instead(
    job_id: str, detail: str, status_code: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An answer naming a job that exists and goes on, with the links to follow it."""
    body = TimeoutDetail(detail=detail, job_id=job_id, links=JobLinks.for_job(job_id))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


async def wait_while_connected(
    hub: EventHub, request: Request, job_id: str, timeout_s: float
) -> bool | None:
    """Whether the job's `done` came within timeout_s, or None once the client disconnected.

    Raises RedisError when Redis cannot be read."""
    wait = asyncio.ensure_future(hub.wait_done(job_id, timeout_s))
    try:
        while True:
            done, _ = await asyncio.wait({wait}, timeout=DISCONNECT_POLL_S)
            if done:
                return wait.result()
            if await request.is_disconnected():
                return None
    finally:
        if not wait.done():
            wait.cancel()  # ends its hub subscription
            await asyncio.wait({wait})


async def cancel_abandoned(job_id: str, store: JobStore) -> JSONResponse:
    """Cancel the job of a client that left (the store's cancel: a queued job never runs, a
    running one stops at its next step); the answer goes nowhere."""
    try:
        await store.cancel(job_id)
    except RedisError as exc:
        log.warning("job %s: its client disconnected, and cancelling it failed: %s", job_id, exc)
    return JSONResponse(
        {"detail": "client disconnected: job cancelled", "job_id": job_id}, CLIENT_GONE
    )


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        tags=["seed compatibility"],
        dependencies=auth.openapi_security(settings), route_class=auth.KeyCheckedRoute,
        responses={
            401: {"model": Detail, "description": "Missing or invalid API key."},
            409: {"model": Detail, "description": "The job was cancelled."},
            413: {"model": Detail, "description": "Body over the size limit."},
            502: {"model": Detail, "description": "The job failed in the worker."},
            503: {
                "model": Detail,
                "description": "Redis unavailable or nearly full (LLM_REDIS_MEMORY_WATERMARK); see "
                "Retry-After. When it failed after the job "
                "was queued, the body also holds job_id and links: poll that job.",
            },
            504: {"model": TimeoutDetail, "description": "Not done in time; poll the job."},
        },
    )
    WithPrompt, WithoutPrompt = legacy_request_models(settings)
    Timeout = Annotated[
        float,
        Query(gt=0, le=settings.sync_timeout_s, description="Wait at most this long (s)."),
    ]

    async def run(
        prompt: str, tokens: int, timeout_s: float | None, store: JobStore, celery: Celery,
        limits: ModelLimitsCache, hub: EventHub, request: Request,
    ) -> JobRecord | JSONResponse:  # fmt: skip
        # The seed sampled at temperature 1 for exactly num_of_token_generated tokens.
        req = JobRequest(
            prompt=prompt, max_new_tokens=tokens, temperature=1.0, eos=False, truncate="left"
        )
        record, _ = await submit_job(
            req, store=store, celery=celery, limits=limits, settings=settings, locs=LOCS
        )
        try:
            done = await wait_while_connected(
                hub, request, record.id, timeout_s or settings.sync_timeout_s
            )
            if done is None:
                return await cancel_abandoned(record.id, store)
            final = await store.get(record.id) if done else None
        except RedisError:
            detail = "job store unavailable while waiting; the job is queued: poll it"
            return poll_instead(record.id, detail, 503, {"Retry-After": str(RETRY_AFTER_S)})
        if not done:
            return poll_instead(record.id, "generation still running; poll the job", 504)
        if final is None:
            raise HTTPException(502, "the job expired before it could be read")
        if final.status == JobStatus.failed:
            return JSONResponse({"detail": final.error or "failed", "job_id": final.id}, 502)
        if final.status == JobStatus.cancelled:
            return JSONResponse({"detail": "job cancelled", "job_id": final.id}, 409)
        return final

    @router.post("/generate_text", response_model=TextGenerationResponse)
    async def generate_text(
        request: Request,
        body: WithPrompt,  # type: ignore[valid-type]
        timeout_s: Timeout = None,  # type: ignore[assignment]
        store: JobStore = Depends(deps.get_store),
        celery: Celery = Depends(deps.get_celery),
        limits: ModelLimitsCache = Depends(deps.get_limits),
        hub: EventHub = Depends(deps.get_events),
    ):
        """The seed's endpoint: generated_text is the prompt followed by its continuation."""
        out = await run(body.prompt, body.num_of_token_generated, timeout_s, store, celery, limits,
                        hub, request)  # fmt: skip
        if isinstance(out, JSONResponse):
            return out
        return TextGenerationResponse(
            generated_text=body.prompt + (out.text or ""),
            prompt=body.prompt,
            num_of_token_generated=body.num_of_token_generated,
        )

    @router.post(
        "/generate_text_without_prompt", response_model=TextGenerationWithoutPromptResponse
    )
    async def generate_text_without_prompt(
        request: Request,
        body: WithoutPrompt,  # type: ignore[valid-type]
        timeout_s: Timeout = None,  # type: ignore[assignment]
        store: JobStore = Depends(deps.get_store),
        celery: Celery = Depends(deps.get_celery),
        limits: ModelLimitsCache = Depends(deps.get_limits),
        hub: EventHub = Depends(deps.get_events),
    ):
        """The seed's prompt-less endpoint (it started from "First Citizen:")."""
        prompt = LEGACY_DEFAULT_PROMPT
        out = await run(prompt, body.num_of_token_generated, timeout_s, store, celery, limits, hub,
                        request)  # fmt: skip
        if isinstance(out, JSONResponse):
            return out
        return TextGenerationWithoutPromptResponse(
            generated_text=prompt + (out.text or ""),
            num_of_token_generated=body.num_of_token_generated,
        )

    return router
