"""Shared by the API and the worker: settings, Redis key names, the job record, Celery setup.

Light imports only (pydantic, redis, celery): it must never import torch or lmcore's model code.
"""
