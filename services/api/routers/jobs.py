"""`/jobs`: submit, read, stream (SSE) and cancel generation jobs.

Handlers talk to Redis through JobStore (which also enqueues the Celery task); none generates.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app request model object.

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio

from celery import Celery
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Response, status
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.api import auth, deps
from services.api.events import EventHub, Subscription
from services.api.model_limits import ModelLimitsCache
from services.api.schemas import Detail, JobCreated, JobLinks, JobView, job_request_model
from services.api.store import LAST_ENTRY_PART, JobStore
from services.api.submit import parse_idempotency_key, submit_job
from services.common.settings import Settings

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
EVENT_ID = r"^\d{1,20}-\d{1,20}$"
# Without events for WAIT_S the stream checks whether its job is still alive; each quiet check
# doubles the wait up to MAX_WAIT_S. While the job is queued its stream is parked and does not
# check at all: the event hub checks the queued jobs of all its streams together, so a backlog of
# waiting clients costs no timer and no Redis read per client.
WAIT_S = 2.0
MAX_WAIT_S = 30.0
SHUTDOWN_GRACE_S = 1.0  # for a stream to end by itself once the server is stopping
COMMON = {
    401: {"model": Detail, "description": "Missing or invalid API key."},
    503: {"model": Detail, "description": "Redis unavailable or nearly full "
                                         "(LLM_REDIS_MEMORY_WATERMARK); see Retry-After."},
}
NOT_FOUND = {404: {"model": Detail, "description": "No such job (or it expired)."}}


def _event_of(kinds: list[str], data: dict) -> dict:
    """An event of these kinds whose data is JSON text matching `data`."""
    return {"properties": {
        "event": {"enum": kinds},
        "data": {"contentMediaType": "application/json", "contentSchema": data},
    }}  # fmt: skip


TOKEN_DATA = {
    "type": "object", "required": ["text", "tokens"],
    "properties": {"text": {"type": "string"}, "tokens": {"type": "integer", "minimum": 0}},
}  # fmt: skip
# The record as GET /jobs/{id} shows it; only id and status if it expired as the stream ended.
DONE_DATA = {"anyOf": [
    {"$ref": "#/components/schemas/JobView"},
    {"type": "object", "required": ["id", "status"], "additionalProperties": False,
     "properties": {"id": {"type": "string"},
                    "status": {"$ref": "#/components/schemas/JobStatus"}}},
]}  # fmt: skip
# One event, with its data by kind. In OpenAPI 3.1 (and for schemathesis) the `schema` of
# text/event-stream describes each event; `{"type": "string"}` failed every event.
EVENT = {
    "type": "object", "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": EVENT_ID},
        "event": {"enum": ["token", "reset", "done"]},
        "data": {"type": "string"},
    },
    "oneOf": [_event_of(["token", "reset"], TOKEN_DATA), _event_of(["done"], DONE_DATA)],
}  # fmt: skip


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        prefix="/jobs", tags=["jobs"], responses=COMMON,
        dependencies=auth.openapi_security(settings), route_class=auth.KeyCheckedRoute,
    )  # fmt: skip
    Request = job_request_model(settings)

    @router.post(
        "",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=JobCreated,
        responses={
            409: {"model": Detail, "description": "Same Idempotency-Key still in progress."},
            413: {"model": Detail, "description": "Body over the size limit."},
        },
    )
    async def create_job(
        body: Request,  # type: ignore[valid-type]
        response: Response,
        # `str = None`, not `str | None`: a header is never JSON null, so the schema says string.
        idempotency_key: Annotated[
            str, Header(alias="Idempotency-Key", min_length=1, max_length=255)
        ] = None,  # type: ignore[assignment]
        store: JobStore = Depends(deps.get_store),
        celery: Celery = Depends(deps.get_celery),
        limits: ModelLimitsCache = Depends(deps.get_limits),
        principal: str = Depends(deps.get_principal),
    ) -> JobCreated:
        """Queue a generation job; poll `links.self` or stream `links.events`."""
        record, _ = await submit_job(
            body, store=store, celery=celery, limits=limits, settings=settings,
            idempotency_key=parse_idempotency_key(idempotency_key), principal=principal,
        )  # fmt: skip
        response.headers["Location"] = f"/jobs/{record.id}"
        return JobCreated(id=record.id, status=record.status, links=JobLinks.for_job(record.id))

    @router.get("/{job_id}", response_model=JobView, responses=NOT_FOUND)
    async def get_job(job_id: JobId, store: JobStore = Depends(deps.get_store)) -> JobView:
        """Status, result, error, timings and the model version that answered."""
        record = await store.get(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id}")
        return JobView.from_record(record)

    @router.post(
        "/{job_id}/cancel",
        response_model=JobView,
        responses={
            **NOT_FOUND,
            202: {"model": JobView, "description": "Running: it stops within one decode step."},
        },
    )
    async def cancel_job(
        job_id: JobId, response: Response, store: JobStore = Depends(deps.get_store)
    ) -> JobView:
        """A queued job never runs; a running one stops between decode steps, keeping its text.

        200 with the record when the job is final (cancelled now or earlier, or finished).
        """
        outcome = await store.cancel(job_id)
        if outcome == "missing":
            raise HTTPException(404, f"no job {job_id}")
        record = await store.get(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id}")
        if outcome == "running":
            response.status_code = status.HTTP_202_ACCEPTED
        return JobView.from_record(record)

    @router.get(
        "/{job_id}/events",
        response_class=EventSourceResponse,
        responses={
            **NOT_FOUND,
            200: {
                "description": "Server-Sent Events: `token` {text, tokens}, rarely `reset` "
                "{text, tokens} (replace what you have), then one `done` with the job record. "
                "The last reset's tokens plus the tokens since are the result's "
                "completion_tokens. Send Last-Event-ID to resume after an event.",
                "content": {"text/event-stream": {"schema": EVENT}},
            },
            204: {
                "description": "The job is final and Last-Event-ID is at or past its last event: "
                "nothing more will come (an EventSource stops reconnecting)."
            },
        },
    )
    async def job_events(
        job_id: JobId,
        last_event_id: Annotated[
            str, Header(alias="Last-Event-ID", pattern=EVENT_ID)
        ] = None,  # type: ignore[assignment]
        store: JobStore = Depends(deps.get_store),
        hub: EventHub = Depends(deps.get_events),
    ) -> EventSourceResponse:
        """The job's tokens as they are generated; a late client gets them all from the start."""
        if last_event_id is not None:
            _check_event_id(last_event_id)
        record = await store.get(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id}")
        if (
            last_event_id is not None and record.status.final
            and not await store.events_after(job_id, last_event_id)
        ):  # fmt: skip
            # Resumed after the final event: SSE's "stop reconnecting". An empty 200 after a
            # quiet wait had an EventSource reconnect every few seconds while the record lived.
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        # A server shutdown (SIGTERM: a rolling update) ends the stream with its terminating
        # chunk, so the client resumes with Last-Event-ID elsewhere; cut, it raised instead.
        shutdown = anyio.Event()
        stream = _stream(store, hub, job_id, last_event_id or "0-0", shutdown)
        return EventSourceResponse(
            stream, ping=15, shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S
        )

    return router


def _check_event_id(event_id: str) -> None:
    """422 for an id Redis would refuse (a part above 2**64 - 1): the hub reads every open
    stream in one XREAD, and one bad cursor there would end all of them."""
    if any(int(part) > LAST_ENTRY_PART for part in event_id.split("-")):
        raise RequestValidationError([{
            "type": "value_error", "loc": ("header", "Last-Event-ID"), "input": event_id,
            "msg": f"not a stream entry id: each part is at most {LAST_ENTRY_PART}",
        }])  # fmt: skip


async def _stream(
    store: JobStore, hub: EventHub, job_id: str, after: str, shutdown: anyio.Event | None = None
) -> AsyncIterator[ServerSentEvent]:
    sent = after  # the last entry id this client was sent
    closer: asyncio.Future[None] | None = None
    try:
        async with hub.subscribe(job_id, after) as subscription:
            if shutdown is not None:
                closer = asyncio.ensure_future(_close_on(shutdown, subscription))
            wait_s = WAIT_S
            while True:
                entries = await subscription.next(wait_s, no_timeout_while_parked=True)
                if subscription.closing:
                    return  # the server is stopping: end cleanly, the client resumes elsewhere
                if not entries:
                    status = await store.status(job_id)
                    if status is None:
                        return  # expired
                    if status.final:
                        # The job may have finished just now, its last entries and `done` not
                        # handed over yet: read them straight from the stream, then end.
                        entries = await store.events_after(job_id, sent)
                        if not entries:
                            return  # resumed as it ended (a later resume is a 204)
                    else:
                        wait_s = min(2 * wait_s, MAX_WAIT_S)
                        continue
                wait_s = WAIT_S
                for entry_id, fields in entries:
                    yield await _event(store, job_id, entry_id, fields)
                    sent = entry_id
                    if fields.get("type") == "done":
                        return
    except RedisError:
        return  # the client reconnects with Last-Event-ID and misses nothing
    finally:
        if closer is not None:
            closer.cancel()


async def _close_on(shutdown: anyio.Event, subscription: Subscription) -> None:
    """Close the subscription once the server is stopping (sse_starlette sets the event)."""
    await shutdown.wait()
    subscription.close_soon()


async def _event(store: JobStore, job_id: str, entry_id: str, fields: dict) -> ServerSentEvent:
    """One stream entry as an SSE event; `done` carries the job record."""
    kind = fields.get("type", "token")
    if kind == "done":
        record = await store.get(job_id)
        # json.dumps escapes U+2028, U+2029 and U+0085, which line readers split lines at.
        data = (
            json.dumps(JobView.from_record(record).model_dump(mode="json"))
            if record
            else json.dumps({"id": job_id, "status": fields.get("status")})
        )
        return ServerSentEvent(data=data, event="done", id=entry_id)
    payload = {"text": fields.get("text", ""), "tokens": int(fields.get("tokens") or 0)}
    return ServerSentEvent(data=json.dumps(payload), event=kind, id=entry_id)
