"""``python -m api --host 127.0.0.1 --port 8000``: run the API with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from api.main import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api", description="Run the Tuneforge REST API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    if args.workers > 1:
        uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers, log_config=None)
    else:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None)


if __name__ == "__main__":
    main()
