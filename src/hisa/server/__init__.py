"""OpenAI-compatible HTTP server: `hisa serve` (FastAPI + uvicorn) with the engine loop on a background thread.

Modules: `app` (create_app: routes, errors, SSE), `async_engine` (the engine thread and its asyncio
bridge), `protocol` (request/response models), `metrics` (Prometheus), `cli` (`serve`, `bench-serve`).
Nothing is imported here, so `hisa --help` does not pay for FastAPI. See docs/server.md.
"""
