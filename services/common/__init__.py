"""Shared by the API, the worker and the local stack: settings, Redis key names, the job record,
Celery setup, process helpers.

Light imports only (pydantic, redis, celery): it must never import torch or lmcore's model code.
"""
