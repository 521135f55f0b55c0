"""Jobs accepted per second by ONE API process (PostgreSQL + Redis), and p99 latency.

Targets (issue 2): >= 1,000 jobs/s, p99 <= 50 ms. No worker runs: this is acceptance only
(the model is announced in the registry as a worker would). The load comes from `wrk`
(Debian package `wrk`; a C load generator), because a Python client on this 2-core
machine tops out near 250 requests/s by itself and would measure only itself.

    apt-get install -y wrk
    .venv/bin/python bench/submit.py [--seconds 15] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.stack import KEY, bench_logs, bench_stack

MODEL = "bench-model"
LUA = """
wrk.method = "POST"
wrk.body = '{"model": "%s", "max_tokens": 16, '
    .. '"messages": [{"role": "user", "content": "hello there"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def run_wrk(url: str, seconds: int, connections: int, script: Path) -> str:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        f"{url}/v1/jobs",
    ]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/submit.py needs wrk: apt-get install -y wrk")
    with bench_stack(bench_logs()) as stack:
        url = stack.add_api("api", FERRY_LOG_LEVEL="warning")
        redis.Redis.from_url(stack.env["FERRY_REDIS_URL"]).hset(
            "ferry:models",
            MODEL,
            json.dumps(
                {
                    "name": MODEL,
                    "max_model_len": 2048,
                    "engine": "vllm",
                    "supports_images": False,
                    "created": 0,
                }
            ),
        )
        script = stack.logs / "post.lua"
        script.write_text(LUA % (MODEL, KEY))
        run_wrk(url, 3, args.connections, script)  # warm-up
        out = run_wrk(url, args.seconds, args.connections, script)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)$", out, re.MULTILINE))
    print(
        f"submit: {args.connections} connections for {args.seconds} s (wrk), "
        f"{non2xx.group(1) if non2xx else 0} non-202 answers"
    )
    print(f"submit: {rate:,.0f} jobs/s accepted (target >= 1,000)")
    print(
        f"submit: latency p50 {latency.get('50')}, p90 {latency.get('90')}, "
        f"p99 {latency.get('99')} (target p99 <= 50 ms)"
    )


if __name__ == "__main__":
    main()
