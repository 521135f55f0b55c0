"""Async Ferry clients for benchmarks: submit a job, follow its SSE stream to the end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx
from httpx_sse import aconnect_sse


@dataclass
class StreamResult:
    job_id: str
    completion_tokens: int = 0
    text: str = ""
    # Engine-emit -> client-receive delay of each delta, seconds.
    delays: list[float] = field(default_factory=list)
    finished_at: float = 0.0


async def submit_and_follow(
    client: httpx.AsyncClient, body: dict[str, object]
) -> StreamResult:
    response = await client.post("/v1/jobs", json=body)
    response.raise_for_status()
    result = StreamResult(response.json()["id"])
    async with aconnect_sse(client, "GET", f"/v1/jobs/{result.job_id}/events") as source:
        async for sse in source.aiter_sse():
            received = time.time()
            if not sse.data:  # a keep-alive comment
                continue
            data = json.loads(sse.data)
            if sse.event == "delta":
                result.text += data["text"]
                if "ts" in data:
                    result.delays.append(received - data["ts"])
            elif sse.event == "usage":
                result.completion_tokens = data["completion_tokens"]
            elif sse.event in ("done", "error", "cancelled"):
                if sse.event != "done":
                    raise RuntimeError(f"job {result.job_id} ended with {sse.event}: {data}")
                break
    result.finished_at = time.perf_counter()
    return result
