"""Real Ferry processes for end-to-end tests and benchmarks: API servers and Celery workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 60) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process and everything it started (vLLM's engine core)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def start(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    popen = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so kill() takes its children
    )
    return Proc(name, popen, log_path)


def start_api(name: str, env: dict[str, str], log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = start(name, ["api", "--port", str(port)], env, log_dir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.log_tail()}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    _started_or_killed(proc, lambda: wait_until(up, 60, f"{name} to answer"))
    return proc, url


def start_worker(
    name: str,
    model: str,
    served_name: str,
    engine: str,
    env: dict[str, str],
    log_dir: Path,
    registered: Callable[[str], bool],
    timeout: float = 600,
) -> Proc:
    worker_env = {**env, "FERRY_SERVED_MODEL_NAME": served_name}
    proc = start(name, ["worker", "--model", model, "--engine", engine], worker_env, log_dir)

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.log_tail()}")
        return registered(proc_worker_marker(proc))

    _started_or_killed(
        proc, lambda: wait_until(ready, timeout, f"{name} to announce {served_name}", 0.5)
    )
    return proc


def _started_or_killed(proc: Proc, wait: Callable[[], None]) -> None:
    """A process that never came up (or a test timeout while waiting) must not outlive the
    test run: nobody else holds its handle yet."""
    try:
        wait()
    except BaseException:
        proc.kill()
        raise


def proc_worker_marker(proc: Proc) -> str:
    """Workers' ids contain their pid: `<host>:<pid>:<random>`."""
    return f":{proc.popen.pid}:"


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()
