"""Routers of the API, one per resource: jobs, the seed's endpoints, and operations.

Each module exposes a `build_router(settings)`: request bounds come from settings.
"""
