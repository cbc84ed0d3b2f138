"""``python -m serving --host 127.0.0.1 --port 8001``: run the gateway under uvicorn, logging JSON
lines (one per request, each with its request id)."""

from __future__ import annotations

import argparse

from serving.app import create_app
from serving.logs import configure_logging
from serving.server import serve
from serving.settings import get_serving_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving", description="Tuneforge's OpenAI-compatible inference gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    # Built before uvicorn starts so that bad settings fail the process at once, with their message.
    settings = get_serving_settings()
    app = create_app(settings)
    serve(app, settings, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
