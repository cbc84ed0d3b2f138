"""How the gateway logs: structlog on top of stdlib logging, one JSON object per line, each carrying
the request id bound by ``serving.middleware`` (so a request can be followed across the access line,
the engine choice, the adapter load and its usage record)."""

from __future__ import annotations

import logging

import structlog


def configure_logging(level: str = "info", *, json_lines: bool = True) -> None:
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(message)s")
    # HTTP clients' own per-call lines: the gateway's own lines already say which engine served what.
    for name in ("httpx", "aiohttp"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
