"""`ferry submit`: a person at a terminal sends a prompt and reads the answer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from cli.settings import CliSettings


def add_connection_args(parser: argparse.ArgumentParser, settings: CliSettings) -> None:
    parser.add_argument("--server", default=settings.server)
    parser.add_argument(
        "--api-key",
        default=None,
        help="default: $FERRY_API_KEY, else .ferry/api-key from `ferry serve`",
    )


def api_key(args: argparse.Namespace) -> str:
    if args.api_key:
        return str(args.api_key)
    configured = CliSettings().api_key
    if configured:
        return configured
    path = Path(".ferry") / "api-key"
    if path.exists():
        return path.read_text().strip()
    raise SystemExit("no API key: pass --api-key or set FERRY_API_KEY")


def _client(args: argparse.Namespace) -> httpx.Client:
    return httpx.Client(
        base_url=args.server,
        timeout=httpx.Timeout(30, read=None),
        headers={"Authorization": f"Bearer {api_key(args)}"},
    )


def _fail(response: httpx.Response) -> None:
    if response.is_error:
        raise SystemExit(f"error {response.status_code}: {response.text}")


def submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = args.model
        if model is None:
            listing = client.get("/v1/models")
            _fail(listing)
            data = listing.json()["data"]
            if not data:
                raise SystemExit("the server serves no model yet")
            model = data[0]["id"]
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": "user", "content": args.prompt}],
        }
        if args.max_tokens:
            body["max_tokens"] = args.max_tokens
        created = client.post("/v1/jobs", json=body)
        _fail(created)
        job_id = created.json()["id"]
        print(f"job {job_id}", file=sys.stderr)
        if args.stream:
            _print_stream(client, job_id)
        else:
            _print_result(client, job_id)
    return 0


def _print_stream(client: httpx.Client, job_id: str) -> None:
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        for event in source.iter_sse():
            data = json.loads(event.data) if event.data else {}
            if event.event == "delta":
                print(data["text"], end="", flush=True)
            elif event.event == "retry":
                print("\n[worker lost; restarting]", file=sys.stderr)
            elif event.event in ("done", "error", "cancelled", "expired"):
                print()
                if event.event != "done":
                    print(f"[{event.event}] {data.get('message', '')}", file=sys.stderr)
                return


def _print_result(client: httpx.Client, job_id: str) -> None:
    # The event stream ends when the job does: wait on it, then read the job.
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        for event in source.iter_sse():
            if event.event in ("done", "error", "cancelled", "expired"):
                break
    job = client.get(f"/v1/jobs/{job_id}")
    _fail(job)
    body = job.json()
    if body["status"] != "succeeded":
        raise SystemExit(f"job {body['status']}: {(body.get('error') or {}).get('message')}")
    print(body["result"]["text"])
