"""`ferry`: serve the embedded default, run the API or a worker, submit from a terminal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import batch, client, embedded, keys, lifetime
from cli.settings import CliSettings
from storage.logs import TEXT_FORMAT, LogFormat, use_format
from storage.logs import configure as configure_logs

if __name__ == "__mp_main__":
    # A process `ferry worker` spawned (vLLM's engine core under the spawn start method)
    # dies with the worker: see cli/lifetime.py.
    lifetime.arm_spawned_child()

if TYPE_CHECKING:
    from storage.telemetry import TelemetrySettings
    from worker.settings import WorkerSettings


def telemetry_settings(command: str, service: str) -> TelemetrySettings:
    """FERRY_LOG_FORMAT and the tracing settings, with this process's spans exported as
    `service` when tracing is on; a bad value ends the command naming it."""
    from pydantic import ValidationError

    from storage.telemetry import TelemetrySettings, configure_tracing

    try:
        settings = TelemetrySettings()
        configure_tracing(service, settings)
    except ValidationError as exc:
        bad = "; ".join(f"FERRY_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        print(f"ferry {command}: cannot start: {bad}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:
        print(f"ferry {command}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.core.settings import get_api_settings
    from storage.logs import uvicorn_config

    telemetry = telemetry_settings("api", "ferry-api")
    # FERRY_HOST and FERRY_PORT unless the flags say otherwise.
    settings = get_api_settings()
    host = settings.host if args.host is None else args.host
    port = settings.port if args.port is None else args.port
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        **log_config(uvicorn_config(args.log_level, telemetry.log_format)),
    )
    return 0


def log_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """uvicorn.run's log_config argument: left out (uvicorn's own) unless given."""
    return {} if config is None else {"log_config": config}


# `ferry worker` flags named as vLLM names them, each the WorkerSettings field of its name.
_VLLM_FLAGS = (
    "max_model_len",
    "served_model_name",
    "dtype",
    "tensor_parallel_size",
    "quantization",
    "gpu_memory_utilization",
    "limit_mm_per_prompt",
    "max_lora_rank",
    "reasoning_parser",
    "tool_call_parser",
    "engine_args",
)


def _worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings: its flags, over the FERRY_ variables for the rest."""
    from worker.settings import WorkerSettings

    if args.model_tag and args.model and args.model_tag != args.model:
        raise SystemExit(
            f"ferry worker: error: two models given: {args.model_tag} and --model {args.model}"
        )
    flags: dict[str, Any] = {}
    model = args.model or args.model_tag
    if model:
        flags["model"] = model
    if args.engine:
        flags["engine"] = args.engine
    if args.concurrency:
        flags["concurrency"] = args.concurrency
    if args.torch_threads:
        flags["torch_threads"] = args.torch_threads
    for flag in _VLLM_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            flags[flag] = value
    if args.trust_remote_code:
        flags["trust_remote_code"] = True
    if args.lora_modules:
        flags["lora_modules"] = args.lora_modules
    return WorkerSettings(**flags)


def _json_object(flag: str) -> Any:
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON object, got {text}")
        return value

    return parse


def _worker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.engines import resolve_model_path
    from worker.engines.options import lora_adapters
    from worker.errors import StartupError
    from worker.settings import use_worker_settings

    telemetry = telemetry_settings("worker", "ferry-worker")
    _log_format(args.log_level, telemetry.log_format)
    try:
        settings = _worker_settings(args)
        # The Celery worker below (this process) runs with these.
        use_worker_settings(settings)
        _build_model(settings.model, settings.model_cache_dir, args.log_level)
        # The cheap checks before Celery starts; the engine makes the rest at its start.
        adapters = lora_adapters(settings, resolve_model_path(settings))
    except (ValidationError, StartupError, ValueError) as exc:
        print(f"ferry worker: cannot start: {exc}", file=sys.stderr)
        return 2
    from storage.keys import Lane, queue_name
    from worker.celery_app import app

    # The engine core (which the runner's loop thread starts at worker_init) must not
    # outlive this process, however it ends.
    lifetime.children_die_with_this_process()
    name = settings.model_name
    # An adapter's jobs come on its own queues, which only workers that serve it read.
    queues = [queue_name(n, lane) for n in [name, *(a.name for a in adapters)] for lane in Lane]
    app.worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(settings.task_threads),
            "-Q",
            ",".join(queues),
            "--hostname",
            f"ferry-{name.replace('/', '_')}@%h-{os.getpid()}",
            "--loglevel",
            args.log_level.upper(),
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _build_model(model: str, cache_dir: Path, log_level: str) -> None:
    """A model Ferry builds itself is built (first use) before Celery starts, so a build
    that fails ends the worker with its reason, not a traceback from inside Celery."""
    from worker.errors import ModelBuildError
    from worker.models import ensure_model, is_built_model

    if not is_built_model(model):
        return
    logging.basicConfig(level=log_level.upper(), format=TEXT_FORMAT)
    try:
        ensure_model(model, cache_dir)
    except ModelBuildError as exc:
        sys.exit(f"ferry worker: {exc}")


def _log_format(level: str, log_format: LogFormat) -> None:
    """The worker's lines in this format: its own handler now, and Celery's once Celery
    has set up its loggers (it replaces the root logger's handlers)."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    configure_logs(level, log_format)

    def reformat(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            use_format(handler, log_format)

    after_setup_logger.connect(reformat, weak=False)
    after_setup_task_logger.connect(reformat, weak=False)


def _migrate(_: argparse.Namespace) -> int:
    from storage.migrate import upgrade
    from storage.settings import get_storage_settings

    upgrade(get_storage_settings().database_url)
    return 0


def _check_worker(_: argparse.Namespace) -> int:
    """A container health check: 0 while a worker on this host has a live heartbeat in the
    registry, 1 when none has. Redis out of reach is 0, said on stderr: a probe that
    restarted every worker whenever Redis blinked would turn an outage into a reload of
    every model."""
    import socket

    import redis

    from storage.registry import live_worker_ids
    from storage.settings import get_storage_settings

    host = socket.gethostname()
    url = get_storage_settings().redis_url
    try:
        with redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5) as r:
            ids = live_worker_ids(r)
    except redis.RedisError as exc:
        print(
            f"check-worker: Redis cannot be reached ({exc}); not held against the worker",
            file=sys.stderr,
        )
        return 0
    # Worker ids are `host:pid:suffix` (worker/runner.py).
    mine = [worker_id for worker_id in ids if worker_id.split(":", 1)[0] == host]
    if mine:
        print(f"check-worker: live: {', '.join(mine)}")
        return 0
    print(f"check-worker: no worker on {host} has a live heartbeat", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    settings = CliSettings()
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    parser.add_argument("--log-level", default=settings.log_level)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="embedded default: API + worker + Redis + SQLite")
    serve.add_argument("--data-dir", default=".ferry")
    serve.add_argument("--host", default=None, help="default: FERRY_HOST, else 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: FERRY_PORT, else 8000")
    serve.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="run every request as one built-in owner, whatever its key",
    )
    serve.set_defaults(func=embedded.serve)

    api = commands.add_parser("api", help="run the API (PostgreSQL + Redis from FERRY_*)")
    api.add_argument("--host", default=None, help="default: FERRY_HOST, else 127.0.0.1")
    api.add_argument("--port", type=int, default=None, help="default: FERRY_PORT, else 8000")
    api.set_defaults(func=_api)

    worker = commands.add_parser(
        "worker", help="run a Celery worker with one engine (vLLM's own flag names)"
    )
    worker.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="as `vllm serve MODEL`: the same as --model",
    )
    worker.add_argument(
        "--model",
        default=None,
        help="hub id, directory, SmolLM2-135M-Instruct or a tiny model name",
    )
    worker.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs in the engine at once (vLLM's max_num_seqs)",
    )
    worker.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads the engine computes with (FERRY_TORCH_THREADS)",
    )
    worker.add_argument("--served-model-name", default=None)
    worker.add_argument("--max-model-len", type=int, default=None)
    worker.add_argument(
        "--dtype", default=None, choices=["auto", "half", "float16", "bfloat16", "float", "float32"]
    )
    worker.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own python code (hub models with auto_map)",
    )
    worker.add_argument("--tensor-parallel-size", type=int, default=None)
    worker.add_argument("--quantization", default=None)
    worker.add_argument("--gpu-memory-utilization", type=float, default=None)
    worker.add_argument(
        "--limit-mm-per-prompt",
        default=None,
        type=_json_object("--limit-mm-per-prompt"),
        help="JSON, e.g. '{\"image\": 2}'",
    )
    worker.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="SPEC",
        help='name=path, or JSON {"name", "path", "base_model_name"}; '
        "each adapter is served as its own model id",
    )
    worker.add_argument("--max-lora-rank", type=int, default=None)
    worker.add_argument("--reasoning-parser", default=None, help="a vLLM reasoning parser")
    worker.add_argument("--tool-call-parser", default=None, help="a vLLM tool-call parser")
    worker.add_argument(
        "--engine-args",
        default=None,
        type=_json_object("--engine-args"),
        help="JSON object of other vLLM AsyncEngineArgs keywords",
    )
    worker.set_defaults(func=_worker)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=_migrate)

    check = commands.add_parser(
        "check-worker",
        help="exit 0 while a worker on this host has a live heartbeat (health checks)",
    )
    check.set_defaults(func=_check_worker)

    submit = commands.add_parser("submit", help="send a prompt as a job and print the answer")
    submit.add_argument("prompt")
    submit.add_argument("--stream", action="store_true", help="print tokens as they come")
    submit.add_argument("--model", default=None)
    submit.add_argument("--max-tokens", type=int, default=None)
    client.add_connection_args(submit, settings)
    submit.set_defaults(func=client.submit)

    batch.add_parser(commands, settings)
    keys.add_parser(commands, settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
