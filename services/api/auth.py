"""The optional bearer-key check of the job and seed endpoints, made before the request is read.

A route of KeyCheckedRoute answers 401 before FastAPI parses its body or parameters; this
module must not read the body (a client without a key learns nothing from the parser).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from services.common.settings import Settings

bearer = HTTPBearer(auto_error=False, description="One of LLM_API_KEYS, when set.")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


async def check_api_key(request: Request) -> None:
    """401 unless the bearer token is one of the keys (when keys are set); sets
    request.state.principal."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    credentials = await bearer(request)
    if credentials is None:
        raise _unauthorized("missing Authorization: Bearer <key>")
    token = credentials.credentials.encode()
    matched = False
    for key in keys:  # every key compared, in constant time each
        matched |= hmac.compare_digest(token, key.encode())
    if not matched:
        raise _unauthorized("invalid API key")
    request.state.principal = hashlib.sha256(token).hexdigest()[:16]


class KeyCheckedRoute(APIRoute):
    """A route that checks the key first: as a dependency the check ran after FastAPI had parsed
    the body, so malformed JSON without a key got a 422 with the parser's error, not a 401."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def key_first(request: Request) -> Response:
            await check_api_key(request)
            return await handler(request)

        return key_first


def openapi_security(settings: Settings) -> list:
    """The key in the OpenAPI spec when keys are configured; KeyCheckedRoute enforces it."""
    return [Security(bearer)] if settings.api_keys else []
