"""Helpers shared by the batch tests: JSONL lines, the `openai` SDK on a stack, waiting for
a batch, its jobs' rows in SQL."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
from openai import OpenAI
from openai.types import Batch

from tests.conftest import KEY_A, TINY, Stack

CHAT = "/v1/chat/completions"
ENDED = {"completed", "failed", "expired", "cancelled"}


def chat_line(
    custom_id: str,
    content: str = "Say something.",
    *,
    model: str = TINY,
    max_tokens: int = 8,
    **body: Any,
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
            **body,
        },
    }


def jsonl(lines: list[dict[str, Any] | str]) -> bytes:
    return "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()


def sdk(stack: Stack, key: str = KEY_A, url: str | None = None) -> OpenAI:
    return OpenAI(base_url=f"{url or stack.url}/v1", api_key=key, max_retries=0)


def upload(client: OpenAI, data: bytes, name: str = "input.jsonl") -> str:
    return client.files.create(file=(name, data, "application/jsonl"), purpose="batch").id


def wait_batch(client: OpenAI, batch_id: str, timeout: float = 300) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        time.sleep(0.3)
    raise TimeoutError(f"batch {batch_id} did not end: {batch.status}")


def read_jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines()]


def job_rows(stack: Stack, batch_id: str) -> dict[str, tuple[str, int, Any]]:
    """custom_id -> (status, attempts, finished_at) of the batch's jobs, read in SQL."""
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT custom_id, status, attempts, finished_at FROM jobs WHERE batch_id = %s",
            (batch_id,),
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}
