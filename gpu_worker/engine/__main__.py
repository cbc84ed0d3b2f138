"""``python -m gpu_worker.engine``: load the base models, serve them over HTTP until stopped.

    python -m gpu_worker.engine --host 127.0.0.1 --port 8100 --model tuneforge-tiny [--model other]
        [--data-dir DIR] [--lora-modules name=path ...]

Flags override the ``TUNEFORGE_ENGINE_*`` environment (see ``settings.py``); ``--lora-modules`` loads
adapters at start-up, like vLLM's flag of the same name.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gpu_worker.engine.errors import EngineError
from gpu_worker.engine.settings import EngineSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpu_worker.engine", description="Tuneforge's built-in inference engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", action="append", dest="models", help="a base model to serve (repeatable)")
    p.add_argument("--data-dir", help="platform data folder (models, adapter cache); env TUNEFORGE_DATA_DIR")
    p.add_argument("--storage-url", help="object store for store: adapters; env TUNEFORGE_STORAGE_URL")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA if available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--max-loras", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters to load at start-up")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> EngineSettings:
    flags = {
        "models": args.models,
        "data_dir": args.data_dir,
        "storage_url": args.storage_url,
        "device": args.device,
        "dtype": args.dtype,
        "max_lora_rank": args.max_lora_rank,
        "max_loras": args.max_loras,
        "max_batch_size": args.max_batch_size,
        "max_model_len": args.max_model_len,
    }
    return EngineSettings(**{k: v for k, v in flags.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from gpu_worker.engine.models import ServedModels
    from gpu_worker.engine.server import build_app
    from gpu_worker.loading import ModelLoadError

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    try:
        models = ServedModels(settings)
        for spec in args.lora_modules:
            name, sep, path = spec.partition("=")
            if not sep:
                raise EngineError(f"--lora-modules expects NAME=PATH, got {spec!r}")
            models.load_adapter(name, path)
    except (ModelLoadError, EngineError) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    uvicorn.run(build_app(models), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
