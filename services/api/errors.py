"""Exception handlers: Redis unreachable or refusing is 503 with Retry-After; bad input is 422.

Handlers only translate exceptions into responses; recovery is the Redis client's reconnect.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from services.api.memory import RedisNearlyFull

log = logging.getLogger(__name__)
RETRY_AFTER_S = 2


def unavailable(detail: str = "job store unavailable; retry shortly") -> JSONResponse:
    return JSONResponse(
        {"detail": detail}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    return unavailable()


async def _nearly_full(request: Request, exc: Exception) -> JSONResponse:
    return unavailable(str(exc))  # the watermark logs its own transitions, not each request


def _printable(value: Any) -> Any:
    # A rejected input may hold lone surrogates, or be NaN or infinite (JSON has neither): echo
    # it back printable, never crash on it.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def _raw_body(error: dict[str, Any]) -> dict[str, Any]:
    # Without a JSON Content-Type FastAPI validates the body as raw bytes. Say that is the cause
    # (curl -d sends a form type), and echo the bytes decoded leniently: the encoder's strict
    # decode raised on a latin-1 body, a 500.
    if not isinstance(error.get("input"), bytes):
        return error
    msg = "the body was not read as JSON: send it with Content-Type: application/json"
    return {**error, "msg": msg, "input": error["input"].decode("utf-8", "replace")}


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_raw_body(error) for error in exc.errors()]
    return JSONResponse({"detail": _printable(jsonable_encoder(errors))}, status_code=422)


async def _http_error(request: Request, exc: HTTPException) -> Any:
    # FastAPI answers 400 for a body that is not UTF-8 JSON; it is invalid input like any other.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # Its causes: not UTF-8, not JSON, or a number past Python's 4,300-digit limit.
        error = {"type": "json_invalid", "loc": ["body"],
                 "msg": "body could not be read as JSON (not UTF-8, malformed, or a number of "
                        "over 4,300 digits)"}  # fmt: skip
        return JSONResponse({"detail": [error]}, status_code=422)
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    # Unreachable, and also reachable but refusing (out of memory, a replica turned read-only
    # in a failover, loading its data): each passes, so each is a 503 the client retries.
    app.add_exception_handler(RedisError, _redis_down)
    # Past LLM_REDIS_MEMORY_WATERMARK, before Redis's own cap: new jobs wait, queued ones run.
    app.add_exception_handler(RedisNearlyFull, _nearly_full)
