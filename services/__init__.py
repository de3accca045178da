"""llm-pipeline services: the trainer entry point, the HTTP API, the worker and the CLI.

Thin layers over lmcore; nothing here may be imported by lmcore.
"""
