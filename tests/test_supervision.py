"""`ferry serve` supervises what it starts, and nothing it starts outlives it.

A worker killed outright (as the OOM killer does) is restarted, its vLLM engine core goes
with it, and its jobs are taken over once their leases expire: every stream ends and every
job succeeds. `ferry serve` killed outright takes its Redis, workers and engines with it.
The first tests check the mechanism under both (cli/lifetime.py) on a stand-in worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from cli import embedded
from cli.embedded import WorkerSupervisor
from ferry_testing.procs import ROOT, free_port, wait_until

MODEL = "ferry-tiny-vision"  # as FERRY_MODEL, the one model: `ferry serve` starts one worker
KEY = "sk-ferry-supervision-test"
STREAMS = 4


def _gone(pid: int) -> bool:
    """Exited and reaped, or a zombie nobody reaped yet (it holds no memory)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def _stand_in_worker(mode: str) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """tests/lifetime_child.py: the stand-in and its two children's pids."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lifetime_child", mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    try:
        yield proc, pids
    finally:
        for pid in [proc.pid, *pids]:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_forked_and_spawned_children_die_with_a_killed_worker() -> None:
    with _stand_in_worker("armed") as (proc, pids):
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)
        wait_until(lambda p=pids: all(_gone(pid) for pid in p), 10, "the children to die")


def test_unarmed_children_outlive_a_killed_parent() -> None:
    """What the test above guards against: multiprocessing's children alone live on."""
    with _stand_in_worker("unarmed") as (proc, pids):
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(1)
        assert not any(_gone(pid) for pid in pids)


def _python(code: str) -> Callable[[], subprocess.Popen[bytes]]:
    """A stand-in worker: this Python code, in a process group of its own."""
    return lambda: subprocess.Popen([sys.executable, "-c", code], process_group=0)


def _restarts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]


def test_supervisor_restarts_a_worker_with_back_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ferry.serve")
    supervisor = WorkerSupervisor({"m": _python("raise SystemExit(3)")})
    supervisor.start()
    try:
        wait_until(lambda: len(_restarts(caplog)) >= 3, 30, "three restarts")
    finally:
        supervisor.stop()
    assert _restarts(caplog)[:3] == [
        f"worker for m exited with status 3; restarting in {n} s" for n in (1, 2, 4)
    ]


def test_supervisor_sweeps_an_exited_workers_group(tmp_path: Path) -> None:
    """What a worker leaves in its process group (an engine core that escaped its own
    parent-death signal) is killed when the worker is reaped."""
    pid_file = tmp_path / "pid"
    code = (
        "import subprocess, pathlib\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n"
    )
    supervisor = WorkerSupervisor({"m": _python(code)})
    supervisor.start()
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 30, "the child")
        orphan = int(pid_file.read_text())
        wait_until(lambda: _gone(orphan), 10, "the worker's group to be killed")
    finally:
        supervisor.stop()


def test_supervisor_stop_kills_a_worker_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedded, "WORKER_STOP_SECONDS", 1.0)
    caplog.set_level(logging.WARNING, "ferry.serve")
    pid_file = tmp_path / "pid"
    code = (
        "import os, pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    supervisor = WorkerSupervisor({"m": _python(code)})
    supervisor.start()
    wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 30, "the worker")
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 10
    assert not psutil.pid_exists(int(pid_file.read_text()))  # killed and reaped
    assert _restarts(caplog) == []  # stopping is not a death to recover from


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    started: set[int] = field(default_factory=set)  # every pid it started, for cleanup

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        found = psutil.Process(self.proc.pid).children(recursive=True)
        self.started.update(p.pid for p in found)
        return found

    def worker(self) -> psutil.Process | None:
        """Its one worker process (none between a worker's death and its restart)."""
        workers = [
            p
            for p in psutil.Process(self.proc.pid).children()
            if "worker" in p.cmdline() or "celeryd" in " ".join(p.cmdline())
        ]
        assert len(workers) <= 1, workers
        self.started.update(p.pid for p in workers)
        return workers[0] if workers else None


def _worker_ready(served: Served) -> bool:
    assert served.proc.poll() is None, served.log()[-3000:]
    try:
        with served.client() as client:
            models = client.get("/v1/models", timeout=5).json()["data"]
    except (httpx.HTTPError, KeyError):
        return False
    return any(m["id"] == MODEL and m["workers"] for m in models)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Served]:
    """`ferry serve` on vLLM with one tiny model, with leases and the reconciler fast."""
    tmp = tmp_path_factory.mktemp("supervision")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(
        {
            "FERRY_MODEL": MODEL,
            "FERRY_API_KEYS": KEY,
            "FERRY_MODEL_CACHE_DIR": str(model_cache),
            "FERRY_PORT": str(port),
            # A dead worker's jobs are taken over within seconds, not a minute.
            "FERRY_LEASE_SECONDS": "3",
            "FERRY_HEARTBEAT_SECONDS": "0.5",
            "FERRY_RECONCILE_INTERVAL_SECONDS": "1",
            "FERRY_RECONCILE_GRACE_SECONDS": "2",
            "FERRY_TORCH_THREADS": "1",
            "FERRY_CONCURRENCY": "16",
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
    )
    log_path = tmp / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "serve",
                "--data-dir",
                str(tmp / "data"),
                "--engine",
                "vllm",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until(lambda: _worker_ready(served), 600, "the embedded worker", interval=1)
        served.descendants()
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in served.started:  # a failed test must not leave them behind
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Stream:
    job_ids: list[str] = field(default_factory=list)
    chunks: int = 0
    finish_reason: str | None = None
    done: bool = False
    error: BaseException | None = None


def _stream(served: Served, out: Stream) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with (
            served.client() as client,
            client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as response,
        ):
            assert response.status_code == 200, response.read()
            out.job_ids = response.headers["X-Ferry-Job-Id"].split(",")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    return
                choice = json.loads(line[6:])["choices"][0]
                out.chunks += 1
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except BaseException as exc:  # reported by the test
        out.error = exc


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_killed_worker_is_restarted_and_every_stream_ends(served: Served) -> None:
    worker = served.worker()
    assert worker is not None
    engine_cores = worker.children(recursive=True)
    assert engine_cores, "vLLM's engine core runs as the worker's child"
    streams = [Stream() for _ in range(STREAMS)]
    threads = [threading.Thread(target=_stream, args=(served, s)) for s in streams]
    for thread in threads:
        thread.start()
    wait_until(lambda: all(s.chunks >= 2 or s.error for s in streams), 120, "every stream")
    assert not any(s.done or s.error for s in streams), streams  # all of them mid-stream

    worker.send_signal(signal.SIGKILL)
    wait_until(lambda: "exited with signal 9 (SIGKILL); restarting in" in served.log(), 30, "log")
    assert f"worker for {MODEL} exited with signal 9 (SIGKILL); restarting in 1 s" in served.log()
    # Reaped (no zombie left), and its engine core went with it.
    wait_until(lambda: not psutil.pid_exists(worker.pid), 10, "the old worker to be reaped")
    wait_until(lambda: all(_gone(p.pid) for p in engine_cores), 10, "the old engine core to go")
    wait_until(lambda: served.worker() is not None, 30, "the new worker")

    for thread in threads:
        thread.join(600)
    for stream in streams:
        assert stream.error is None, stream.error
        assert stream.done and stream.finish_reason == "length", stream
    with served.client() as client:
        for stream in streams:
            (job_id,) = stream.job_ids
            job = client.get(f"/v1/jobs/{job_id}").json()
            # Taken over by the new worker once the lease expired: a second attempt.
            assert (job["status"], job["attempts"]) == ("succeeded", 2), job
            assert job["usage"]["completion_tokens"] == 1500, job
    zombies = [
        p for p in psutil.Process(served.proc.pid).children() if p.status() == psutil.STATUS_ZOMBIE
    ]
    assert not zombies


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_nothing_outlives_a_killed_ferry_serve(served: Served) -> None:
    worker = served.worker()
    assert worker is not None and worker.children(), "vLLM's engine core: the worker's child"
    started = served.descendants()
    assert any("redis-server" in " ".join(p.cmdline()) for p in started), started
    served.proc.send_signal(signal.SIGKILL)
    served.proc.wait(10)
    wait_until(lambda: all(_gone(p.pid) for p in started), 10, "Redis, worker and engine to go")
