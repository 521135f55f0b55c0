"""`ferry serve`: the embedded default starts with no servers installed and answers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from ferry_testing.procs import ROOT, Proc, free_port, running, start, wait_until
from tests.conftest import REDIS_BASE

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]

RED_PIXEL_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AA"
    "AAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def test_ferry_serve_answers_with_a_real_model(tmp_path: Path, model_cache: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    # Its address from FERRY_HOST and FERRY_PORT (no flags).
    env.update(
        {
            "FERRY_MODEL_CACHE_DIR": str(model_cache),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "FERRY_HOST": "127.0.0.1",
            "FERRY_PORT": str(port),
        }
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--data-dir", str(data_dir)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: (data_dir / "api-key").exists(), 60, "the API key file")
        key = (data_dir / "api-key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}

        def models_ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                models = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json()
            except httpx.HTTPError:
                return False
            return len([m for m in models["data"] if m["workers"]]) == 2

        wait_until(models_ready, 800, "the embedded workers", interval=1)
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json()["data"]
        # A real text model by default, and a model that takes images beside it, each with
        # the context its own config gives.
        assert {m["id"]: (m["supports_images"], m["max_model_len"]) for m in models} == {
            "SmolLM2-135M-Instruct": (False, 8192),
            "ferry-tiny-vision": (True, 4096),
        }
        # Greedy, and no max_tokens: the answer may use the rest of the context, and ends
        # where the model ends it.
        response = httpx.post(
            f"{url}/v1/chat/completions",
            headers=headers,
            timeout=120,
            json={
                "model": "SmolLM2-135M-Instruct",
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert "Paris" in body["choices"][0]["message"]["content"], body
        assert body["choices"][0]["finish_reason"] == "stop"
        assert (data_dir / "ferry.db").exists()  # SQLite file in the data directory
        image = httpx.post(
            f"{url}/v1/chat/completions",
            headers=headers,
            timeout=120,
            json={
                "model": "ferry-tiny-vision",
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": RED_PIXEL_PNG}},
                            {"type": "text", "text": "What colour is this?"},
                        ],
                    }
                ],
            },
        )
        assert image.status_code == 200, image.text
        assert image.json()["usage"]["prompt_tokens"] > 16  # the image's tokens and more
        # The image went to the object directory under the data directory.
        assert any(p.is_file() for p in (data_dir / "objects" / "images").rglob("*"))
        log_text = log_path.read_text()
        # The random-weight warning names the tiny image model only.
        warnings = [line for line in log_text.splitlines() if "RANDOM-WEIGHT" in line]
        assert len(warnings) == 1 and "`ferry-tiny-vision`" in warnings[0], warnings
        assert (
            "serving `SmolLM2-135M-Instruct` (default, text), `ferry-tiny-vision` (images)"
        ) in log_text
    finally:
        # Its workers, their engines' processes and the embedded Redis, each in a process
        # group of its own.
        started = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in started]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            for child in [proc, *started]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert any("redis-server" in c for c in commands), commands

    def gone(process: psutil.Process) -> bool:
        try:  # a zombie is dead: reaping an orphan is init's business
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(p) for p in started), 10, "what ferry serve started to exit")


def _answers(url: str, proc: Proc | None = None) -> bool:
    if proc is not None and not proc.alive():
        raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_ferry_api_binds_where_ferry_host_and_port_say(
    own_database: str, logs: Path, tmp_path: Path
) -> None:
    """FERRY_HOST and FERRY_PORT place `ferry api` (on another loopback address, so that
    the default one can be seen unused), and --host and --port win over them."""
    env_port, flag_port = free_port(), free_port()
    env = {
        "FERRY_DATABASE_URL": own_database,
        "FERRY_REDIS_URL": f"{REDIS_BASE}/3",  # no test stack uses db 3
        "FERRY_OBJECT_STORE": "local",
        "FERRY_OBJECT_DIR": str(tmp_path / "objects"),
        "FERRY_HOST": "127.0.0.2",
        "FERRY_PORT": str(env_port),
    }
    by_env = start("api-bind-env", ["api"], env, logs)
    by_flags = start(
        "api-bind-flags", ["api", "--host", "127.0.0.1", "--port", str(flag_port)], env, logs
    )
    with running(by_env), running(by_flags):
        for proc, url in (
            (by_env, f"http://127.0.0.2:{env_port}"),
            (by_flags, f"http://127.0.0.1:{flag_port}"),
        ):
            wait_until(lambda p=proc, u=url: _answers(u, p), 60, f"{proc.name} at {url}")
        assert not _answers(f"http://127.0.0.1:{env_port}")
