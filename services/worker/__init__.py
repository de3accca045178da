"""The Celery worker: loads the served model once, runs lmcore's engine, streams tokens to Redis.

Start it with `celery -A services.worker.celery_app:app worker --pool threads --concurrency N`.
"""
