"""FastAPI dependencies: the app's settings, store, Celery app and the optional bearer-key check.

Everything a handler needs arrives through Depends from `app.state`; no module-level clients.
All are `async def`: FastAPI would run a plain `def` dependency in a thread, per request.
"""

from __future__ import annotations

import hashlib
import hmac

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.events import EventHub
from services.api.metrics import HttpMetrics
from services.api.model_limits import ModelLimitsCache
from services.api.store import JobStore
from services.common.settings import Settings

bearer = HTTPBearer(auto_error=False, description="One of LLM_API_KEYS, when set.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_events(request: Request) -> EventHub:
    return request.app.state.events


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_limits(request: Request) -> ModelLimitsCache:
    return request.app.state.model_limits


async def get_metrics(request: Request) -> HttpMetrics:
    return request.app.state.metrics


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    settings: Settings = Depends(get_settings),
) -> None:
    """401 unless the bearer token is one of the keys; sets request.state.principal."""
    if credentials is None:
        raise _unauthorized("missing Authorization: Bearer <key>")
    token = credentials.credentials.encode()
    matched = False
    for key in settings.api_keys:  # every key compared, in constant time each
        matched |= hmac.compare_digest(token, key.encode())
    if not matched:
        raise _unauthorized("invalid API key")
    request.state.principal = hashlib.sha256(token).hexdigest()[:16]


def auth_dependencies(settings: Settings) -> list:
    """Job endpoints' dependencies: the key check only when keys are configured."""
    return [Depends(require_api_key)] if settings.api_keys else []


async def get_principal(request: Request) -> str:
    """Who is calling (a digest of the API key), to scope idempotency keys."""
    return getattr(request.state, "principal", "anonymous")
