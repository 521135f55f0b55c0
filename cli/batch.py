"""`ferry batch`: run a JSONL file of requests as a batch, with a live progress bar; watch,
cancel and download batches.

`ferry batch run` without `--server` starts the embedded default (`ferry serve`: API,
worker, Redis and SQLite under `--data-dir`) for the run and stops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli import client, embedded
from cli.settings import CliSettings

TERMINAL = {"completed", "failed", "expired", "cancelled"}
console = Console(stderr=True)


def add_parser(commands: Any, settings: CliSettings) -> None:
    batch = commands.add_parser("batch", help="run a JSONL batch; watch, cancel, download")
    sub = batch.add_subparsers(dest="batch_command", required=True)

    run = sub.add_parser("run", help="run a JSONL file of requests and write the results")
    run.add_argument("input", type=Path, help="JSONL: {custom_id, method, url, body} per line")
    run.add_argument("-o", "--output", type=Path, required=True, help="results (JSONL)")
    run.add_argument("--errors", type=Path, default=None, help="failed lines (JSONL)")
    run.add_argument(
        "--server", default=None, help="a Ferry URL; without it the embedded default runs the batch"
    )
    run.add_argument("--api-key", default=None)
    run.add_argument(
        "--endpoint", default=None, help="default: the first line's url, else /v1/chat/completions"
    )
    run.add_argument("--completion-window", default="24h")
    run.add_argument("--data-dir", default=".ferry", help="embedded default's data directory")
    run.add_argument(
        "--engine", choices=["vllm", "transformers"], default=None, help="embedded default's engine"
    )
    run.add_argument("--poll-seconds", type=float, default=0.5)
    run.set_defaults(func=run_batch)

    for name, func, text in (
        ("status", status, "show a batch"),
        ("cancel", cancel, "cancel a batch"),
        ("download", download, "download a batch's output and errors"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("batch_id")
        client.add_connection_args(command, settings)
        if name == "download":
            command.add_argument("-o", "--output", type=Path, default=None)
            command.add_argument("--errors", type=Path, default=None)
        command.set_defaults(func=func)


# -- run ---------------------------------------------------------------------------------


def run_batch(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        raise SystemExit(f"no such file: {args.input}")
    if args.server:
        with _http(args.server, client.api_key(args)) as http:
            return _run(http, args)
    with _embedded(args) as (url, key), _http(url, key) as http:
        return _run(http, args)


def _run(http: httpx.Client, args: argparse.Namespace) -> int:
    endpoint = args.endpoint or _first_url(args.input) or "/v1/chat/completions"
    with args.input.open("rb") as source:
        uploaded = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": (args.input.name, source, "application/jsonl")},
        )
    _check(uploaded)
    created = http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": endpoint,
            "completion_window": args.completion_window,
            "metadata": {"source": "ferry batch run", "input": args.input.name[:500]},
        },
    )
    _check(created)
    batch_id = created.json()["id"]
    console.print(f"batch {batch_id}")
    try:
        batch = _follow(http, batch_id, args.poll_seconds)
    except KeyboardInterrupt:
        console.print(f"interrupted: cancelling batch {batch_id}")
        _check(http.post(f"/v1/batches/{batch_id}/cancel"))
        return 130
    return _finish(http, batch, args.output, args.errors)


def _follow(http: httpx.Client, batch_id: str, poll_seconds: float) -> dict[str, Any]:
    """Poll the batch until it ends, drawing done / failed / tokens/s / ETA."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    started: float | None = None
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("validating", total=None, failed=0, rate=0.0)
        while True:
            response = http.get(f"/v1/batches/{batch_id}")
            _check(response)
            batch: dict[str, Any] = response.json()
            if started is None and batch["status"] != "validating":
                started = time.monotonic()
            _draw(progress, task, batch, started)
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(poll_seconds)


def _draw(progress: Progress, task: TaskID, batch: dict[str, Any], started: float | None) -> None:
    counts, usage = batch["request_counts"], batch["usage"]
    elapsed = time.monotonic() - started if started is not None else 0.0
    rate = usage["output_tokens"] / elapsed if elapsed > 0 else 0.0
    progress.update(
        task,
        description=batch["status"],
        total=counts["total"] or None,
        completed=counts["completed"] + counts["failed"],
        failed=counts["failed"],
        rate=rate,
    )


def _finish(http: httpx.Client, batch: dict[str, Any], output: Path, errors: Path | None) -> int:
    counts = batch["request_counts"]
    if batch["status"] == "failed":
        for error in (batch.get("errors") or {}).get("data", [])[:20]:
            console.print(f"  line {error.get('line')}: {error.get('message')}")
        console.print(f"batch failed: no line could run ({counts['total']} lines)")
        return 1
    _save(http, batch.get("output_file_id"), output)
    if errors is not None:
        _save(http, batch.get("error_file_id"), errors)
    elif batch.get("error_file_id"):
        console.print(
            f"{counts['failed']} lines failed: `ferry batch download {batch['id']}` "
            "or --errors FILE writes them"
        )
    console.print(
        f"batch {batch['status']}: {counts['completed']} done, {counts['failed']} "
        f"failed of {counts['total']}; {batch['usage']['output_tokens']:,} tokens; "
        f"results in {output}"
    )
    return 0 if batch["status"] == "completed" else 1


def _save(http: httpx.Client, file_id: str | None, path: Path) -> None:
    """Write a file's content to `path` (an empty file when the batch has none)."""
    with path.open("wb") as out:
        if file_id is None:
            return
        with http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.is_error:
                response.read()
                _check(response)
            for chunk in response.iter_bytes():
                out.write(chunk)


def _first_url(path: Path) -> str | None:
    with path.open("rb") as source:
        for raw in source:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    return None
                return url if isinstance(url, str) else None
    return None


# -- status / cancel / download ----------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    with _http(args.server, client.api_key(args)) as http:
        response = http.get(f"/v1/batches/{args.batch_id}")
        _check(response)
    print(json.dumps(response.json(), indent=2))
    return 0


def cancel(args: argparse.Namespace) -> int:
    with _http(args.server, client.api_key(args)) as http:
        response = http.post(f"/v1/batches/{args.batch_id}/cancel")
        _check(response)
    print(f"batch {args.batch_id}: {response.json()['status']}")
    return 0


def download(args: argparse.Namespace) -> int:
    with _http(args.server, client.api_key(args)) as http:
        response = http.get(f"/v1/batches/{args.batch_id}")
        _check(response)
        batch = response.json()
        if batch["status"] not in TERMINAL:
            raise SystemExit(f"batch {args.batch_id} is {batch['status']}: nothing to download yet")
        output = args.output or Path(f"{args.batch_id}_output.jsonl")
        errors = args.errors or Path(f"{args.batch_id}_errors.jsonl")
        _save(http, batch.get("output_file_id"), output)
        _save(http, batch.get("error_file_id"), errors)
    print(
        f"{output}: {batch['request_counts']['completed']} results; {errors}: "
        f"{batch['request_counts']['failed']} failed lines"
    )
    return 0


# -- plumbing ----------------------------------------------------------------------------


def _http(url: str, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=url,
        timeout=httpx.Timeout(60, read=600),
        headers={"Authorization": f"Bearer {key}"},
    )


def _check(response: httpx.Response) -> None:
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"error {response.status_code}: {message}")


@contextlib.contextmanager
def _embedded(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """`ferry serve` on a free loopback port for the length of the run."""
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    from api.core.settings import ApiSettings

    key = embedded.embedded_api_key(data_dir, ApiSettings().api_keys)
    port = embedded.free_port()
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "--log-level",
        "warning",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]
    if args.engine:
        command += ["--engine", args.engine]
    log_path = data_dir / "batch-run.log"
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "FERRY_API_KEYS": key}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with console.status("starting the embedded Ferry (the engine takes a while)"):
            _wait_ready(server, url, key, log_path)
        yield url, key
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_ready(server: subprocess.Popen[bytes], url: str, key: str, log_path: Path) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the embedded Ferry exited; see {log_path}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            models = httpx.get(
                f"{url}/v1/models", timeout=5, headers={"Authorization": f"Bearer {key}"}
            ).json()
            # Every model the embedded Ferry serves: lines may name any of them.
            ready = {m["id"] for m in models["data"] if m["workers"]}
            if ready.issuperset(embedded.served_models(CliSettings())):
                return
        time.sleep(0.5)
    raise SystemExit(f"the embedded Ferry did not get ready; see {log_path}")
