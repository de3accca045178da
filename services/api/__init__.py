"""The HTTP API: accepts generation jobs, reports them and streams their tokens; never generates.

Start it with `uvicorn services.api.app:create_app --factory`.
"""
