"""FastAPI dependencies: the app's store, Celery app and the caller's identity.

Everything a handler needs arrives through Depends from `app.state`; no module-level clients.
All are `async def`: FastAPI would run a plain `def` dependency in a thread, per request.
"""

from __future__ import annotations

from celery import Celery
from fastapi import Request

from services.api.events import EventHub
from services.api.metrics import HttpMetrics
from services.api.model_limits import ModelLimitsCache
from services.api.store import JobStore


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


async def get_principal(request: Request) -> str:
    """Who is calling (a digest of the API key, set by auth.check_api_key), to scope idempotency
    keys."""
    return getattr(request.state, "principal", "anonymous")
