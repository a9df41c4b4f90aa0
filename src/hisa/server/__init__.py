"""OpenAI-compatible HTTP server: `hisa serve` (FastAPI + uvicorn), engine loop on a background thread.

See docs/server.md. `create_app(engine, served_model_name=...)` builds the ASGI app.
"""

from hisa.server.app import create_app
from hisa.server.async_engine import AsyncEngine, EngineDeadError, EngineStats
from hisa.server.metrics import ServerMetrics

__all__ = ["create_app", "AsyncEngine", "EngineDeadError", "EngineStats", "ServerMetrics"]
