"""`ferry`: serve the embedded default, run the API or a worker, submit from a terminal."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import batch, client, embedded

DEFAULT_ENGINE = "vllm"


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _worker(args: argparse.Namespace) -> int:
    # Settings are read from the environment when the worker package loads.
    if args.model:
        os.environ["FERRY_MODEL"] = args.model
    if args.engine:
        os.environ["FERRY_ENGINE"] = args.engine
    if args.concurrency:
        os.environ["FERRY_CONCURRENCY"] = str(args.concurrency)
    if args.torch_threads:
        os.environ["FERRY_TORCH_THREADS"] = str(args.torch_threads)
    from worker.settings import get_worker_settings

    settings = get_worker_settings()
    _build_model(settings.model, settings.model_cache_dir, args.log_level)
    from storage.keys import queue_name
    from worker.celery_app import app

    name = settings.model_name
    app.worker_main([
        "worker", "--pool", "threads", "--concurrency", str(settings.task_threads),
        "-Q", f"{queue_name(name, 'interactive')},{queue_name(name, 'bulk')}",
        "--hostname", f"ferry-{name.replace('/', '_')}@%h-{os.getpid()}",
        "--loglevel", args.log_level.upper(), "--without-gossip", "--without-mingle",
    ])
    return 0


def _build_model(model: str, cache_dir: Path, log_level: str) -> None:
    """A model Ferry builds itself is built (first use) before Celery starts, so a build
    that fails ends the worker with its reason, not a traceback from inside Celery."""
    from worker.models import ensure_model, is_built_model
    from worker.models.cache import ModelBuildError

    if not is_built_model(model):
        return
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        ensure_model(model, cache_dir)
    except ModelBuildError as exc:
        sys.exit(f"ferry worker: {exc}")


def _migrate(_: argparse.Namespace) -> int:
    from storage.migrate import upgrade
    from storage.settings import get_storage_settings

    upgrade(get_storage_settings().database_url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("FERRY_LOG_LEVEL", "info"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="embedded default: API + worker + Redis + SQLite")
    serve.add_argument("--data-dir", default=".ferry")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    serve.add_argument("--no-auth", action="store_true",
                       help="run every request as one built-in owner, whatever its key")
    serve.set_defaults(func=embedded.serve)

    api = commands.add_parser("api", help="run the API (PostgreSQL + Redis from FERRY_*)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=_api)

    worker = commands.add_parser("worker", help="run a Celery worker with one engine")
    worker.add_argument("--model", default=None,
                        help="hub id, directory, SmolLM2-135M-Instruct or a tiny model name")
    worker.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--torch-threads", type=int, default=None,
                        help="CPU threads the engine computes with (FERRY_TORCH_THREADS)")
    worker.set_defaults(func=_worker)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=_migrate)

    submit = commands.add_parser("submit", help="send a prompt as a job and print the answer")
    submit.add_argument("prompt")
    submit.add_argument("--stream", action="store_true", help="print tokens as they come")
    submit.add_argument("--model", default=None)
    submit.add_argument("--max-tokens", type=int, default=None)
    client.add_connection_args(submit)
    submit.set_defaults(func=client.submit)

    batch.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
