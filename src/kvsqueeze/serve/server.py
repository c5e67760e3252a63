"""Run the server: build the application around a loaded model and serve it with uvicorn until interrupted."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from kvsqueeze.serve.app import create_app
from kvsqueeze.serve.settings import ServerSettings

logger = logging.getLogger("kvsqueeze")


def serve(model: Any, tokenizer: Any, settings: ServerSettings, log_level: str = "info") -> None:
    """Serve `model` on settings.host:settings.port until Ctrl-C (or SIGTERM)."""
    app = create_app(model, tokenizer, settings)
    where = f"http://{settings.host}:{settings.port}/v1"
    logger.info("Serving %s at %s (model id %r)", settings.model_name, where, settings.model_name)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logger.warning("Listening on %s without --api-key: anyone who can reach it can use it", settings.host)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)
