"""Job submission shared by POST /jobs and the seed's endpoints: checks, idempotency, enqueue.

Turns a validated JobRequest into a queued job exactly once; it must not wait for results.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid
from typing import Any

from celery import Celery
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from services.api.memory import RedisNearlyFull
from services.api.model_limits import ModelLimitsCache
from services.api.queue import task_message
from services.api.store import JobStore
from services.common.jobs import JobRecord, JobRequest, fingerprint
from services.common.settings import Settings

log = logging.getLogger(__name__)


def field_error(loc: tuple[str, ...], msg: str, value: Any) -> RequestValidationError:
    """A 422 in FastAPI's own format, naming the offending field."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg, "input": value}])


async def check_context(
    req: JobRequest,
    store: JobStore,
    limits_cache: ModelLimitsCache,
    locs: dict[str, tuple[str, ...]],
) -> None:
    """Prompt tokens + max_new_tokens must fit the served model's window (422 otherwise).

    Skipped until a worker has published its model; the worker then fails such a job instead.
    """
    limits = await limits_cache.get(store)
    if limits is None:
        return
    if req.max_new_tokens >= limits.block_size:
        raise field_error(
            locs["max_new_tokens"],
            f"must be below the model's context window ({limits.block_size} tokens)",
            req.max_new_tokens,
        )
    if req.truncate == "left":
        return
    tokens = await limits.count_tokens(req.prompt)
    if tokens is not None and max(tokens, 1) + req.max_new_tokens > limits.block_size:
        raise field_error(
            locs["prompt"],
            f"prompt is {tokens} tokens; with max_new_tokens={req.max_new_tokens} it exceeds the "
            f"model's context window ({limits.block_size} tokens): shorten it or set "
            "truncate='left'",
            f"<{len(req.prompt)} characters>",
        )


async def check_room(store: JobStore, idem_scope: str | None, digest: str) -> JobRecord | None:
    """None when Redis has room for a new job, else RedisNearlyFull (503). A repeated
    Idempotency-Key still gets its earlier job then (reads only): its client lost the reply."""
    try:
        await store.memory_watermark.check()
    except RedisNearlyFull:
        hit = await store.idempotency_binding(idem_scope) if idem_scope else None
        earlier = await store.get(hit.job_id) if hit and hit.fingerprint == digest else None
        if earlier is None:
            raise
        log.info("job %s returned again for a repeated Idempotency-Key while new jobs are "
                 "refused", earlier.id)  # fmt: skip
        return earlier
    return None


async def submit_job(
    req: JobRequest,
    *,
    store: JobStore,
    celery: Celery,
    limits: ModelLimitsCache,
    settings: Settings,
    idempotency_key: str | None = None,
    principal: str = "anonymous",
    locs: dict[str, tuple[str, ...]] | None = None,
) -> tuple[JobRecord, bool]:
    """(record, created): an Idempotency-Key seen before with the same body returns its job."""
    locs = locs or {"prompt": ("body", "prompt"), "max_new_tokens": ("body", "max_new_tokens")}
    await check_context(req, store, limits, locs)
    job_id = str(uuid.uuid4())
    idem_scope = None if idempotency_key is None else f"{principal}:{idempotency_key}"
    digest = fingerprint(req) if idem_scope is not None else ""
    earlier = await check_room(store, idem_scope, digest)
    if earlier is not None:
        return earlier, False
    if idem_scope is not None:
        hit = await store.claim_idempotency(idem_scope, digest, job_id)
        if hit is not None:
            if hit.fingerprint != digest:
                raise field_error(
                    ("header", "Idempotency-Key"),
                    "this Idempotency-Key was already used with a different request body",
                    idempotency_key,
                )
            earlier = await store.get(hit.job_id)
            if earlier is None:
                raise HTTPException(409, "a request with this Idempotency-Key is in progress")
            log.info("job %s returned again for a repeated Idempotency-Key (principal %s)",
                     earlier.id, principal)  # fmt: skip
            return earlier, False
    if req.seed is None:
        # A fixed seed makes a redelivered job regenerate the very same tokens.
        req = req.model_copy(update={"seed": secrets.randbits(52)})
    record = JobRecord.new(job_id, JobRequest.model_validate(req.model_dump()))
    try:
        await store.create(record, task_message(celery, job_id), idem_scope)
    except Exception:
        # The create may have run with its reply lost: the key is freed only if no job exists,
        # else the client's retry with it gets this job.
        if idem_scope is not None:
            with contextlib.suppress(Exception):
                await store.release_idempotency(idem_scope, job_id)
        raise
    log.info("job %s queued (principal %s, max_new_tokens %d)", job_id, principal,
             req.max_new_tokens)  # fmt: skip
    return record, True


def parse_idempotency_key(raw: str | None) -> str | None:
    """The draft sends a structured-field string ("..."); bare tokens are accepted too."""
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key:
        raise field_error(("header", "Idempotency-Key"), "must not be empty", raw)
    return key
