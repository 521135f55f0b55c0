"""Batches end to end, driven by the official `openai` SDK: upload a JSONL file, create a
batch, poll it, download and parse its output and error files; bad lines, cancel, expiry.
On the session stack (two API processes, a vLLM worker, PostgreSQL, Redis, moto S3)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from prometheus_client.parser import text_string_to_metric_families

from ferry_testing.procs import wait_until
from tests.batching import CHAT, chat_line, job_rows, jsonl, read_jsonl, sdk, upload, wait_batch
from tests.conftest import TINY, Stack
from tests.helpers import assert_error

pytestmark = pytest.mark.timeout(900)


def test_openai_sdk_drives_a_chat_batch(stack: Stack) -> None:
    client = sdk(stack)
    lines = [chat_line(f"req-{i}", f"Tell me about {i}.", max_tokens=4 + i % 5) for i in range(24)]
    input_id = upload(client, jsonl(lines))
    created = client.batches.create(
        input_file_id=input_id, endpoint=CHAT, completion_window="24h", metadata={"run": "sdk"}
    )
    assert created.status == "validating" and created.metadata == {"run": "sdk"}
    batch = wait_batch(client, created.id)

    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (
        batch.request_counts.total,
        batch.request_counts.completed,
        batch.request_counts.failed,
    ) == (24, 24, 0)
    assert batch.model == TINY and batch.error_file_id is None and batch.errors is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at
    assert batch.finalizing_at <= batch.completed_at
    output = read_jsonl(client, batch.output_file_id)
    # In input order, one line per custom_id, each a chat completion the SDK parses.
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
    completion_tokens = 0
    with stack.client() as http:
        for line, out in zip(lines, output, strict=True):
            assert out["error"] is None and out["response"]["status_code"] == 200
            body = ChatCompletion.model_validate(out["response"]["body"])
            assert body.usage is not None
            assert 0 < body.usage.completion_tokens <= line["body"]["max_tokens"]
            completion_tokens += body.usage.completion_tokens
            # The output is the job's stored result (request_id is the job id).
            job = http.get(f"/v1/jobs/{out['response']['request_id']}").json()
            assert job["status"] == "succeeded"
            assert body.choices[0].message.content == job["result"]["text"]
            assert (job["lane"], job["batch_id"], job["custom_id"]) == (
                "bulk",
                batch.id,
                out["custom_id"],
            )
        # GET /v1/jobs: `batch_id` lists the batch's lines (pages of 10), `lane` tells
        # them from interactive jobs.
        listed, after = [], None
        while True:
            page = http.get(
                "/v1/jobs",
                params={"batch_id": batch.id, "limit": 10, **({"after": after} if after else {})},
            ).json()
            listed += page["data"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert sorted(j["custom_id"] for j in listed) == sorted(ln["custom_id"] for ln in lines)
        bulk_ids = {j["id"] for j in listed}
        interactive = http.get("/v1/jobs", params={"lane": "interactive", "limit": 100}).json()
        assert not bulk_ids & {j["id"] for j in interactive["data"]}
        assert all(j["lane"] == "interactive" for j in interactive["data"])
        bulk = http.get("/v1/jobs", params={"lane": "bulk", "limit": 100}).json()
        assert all(j["lane"] == "bulk" for j in bulk["data"]) and bulk["data"]
        refused = http.get("/v1/jobs", params={"lane": "everything"})
        assert refused.status_code == 400 and refused.json()["error"]["param"]
    assert batch.usage is not None and batch.usage.output_tokens == completion_tokens
    assert batch.usage.total_tokens == batch.usage.input_tokens + completion_tokens

    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    output_file = client.files.retrieve(batch.output_file_id or "")
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    listed = {f.id: f.purpose for f in client.files.list()}
    assert listed[input_id] == "batch" and listed[output_file.id] == "batch_output"


def test_completions_batch(stack: Stack) -> None:
    client = sdk(stack)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": TINY,
                "prompt": f"Once upon a time {i}",
                "max_tokens": 6,
                "temperature": 0,
            },
        }
        for i in range(3)
    ]
    input_id = upload(client, jsonl(lines))
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=input_id, endpoint="/v1/completions", completion_window="24h"
        ).id,
    )
    assert batch.status == "completed", batch
    output = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == ["c0", "c1", "c2"]
    for out in output:
        body = Completion.model_validate(out["response"]["body"])
        assert body.object == "text_completion" and body.choices[0].text


def test_bad_lines_go_to_the_error_file_with_line_numbers(stack: Stack) -> None:
    client = sdk(stack)
    lines: list[dict[str, Any] | str] = [
        chat_line("ok-1"),  # 1
        "this is not json",  # 2
        {"method": "POST", "url": CHAT, "body": {}},  # 3 no custom_id
        chat_line("ok-1"),  # 4 repeated custom_id
        {**chat_line("wrong-url"), "url": "/v1/completions"},  # 5
        {"custom_id": "no-messages", "method": "POST", "url": CHAT, "body": {"model": TINY}},  # 6
        chat_line("no-model", model="no-such-model"),  # 7
        {**chat_line("get"), "method": "GET"},  # 8
        "",  # 9 blank: skipped
        chat_line("too-long", max_tokens=10**6),  # 10
        chat_line("ok-2"),  # 11
    ]
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
        ).id,
    )
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (
        batch.request_counts.total,
        batch.request_counts.completed,
        batch.request_counts.failed,
    ) == (10, 2, 8)
    assert [o["custom_id"] for o in read_jsonl(client, batch.output_file_id)] == ["ok-1", "ok-2"]
    errors = read_jsonl(client, batch.error_file_id)
    by_line = {e["error"]["line"]: e for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 10]
    expected = {
        2: "invalid_json",
        3: "missing_custom_id",
        4: "duplicate_custom_id",
        5: "url_mismatch",
        6: "invalid_body",
        7: "model_not_found",
        8: "invalid_method",
        10: "context_length_exceeded",
    }
    for line, code in expected.items():
        entry = by_line[line]
        assert entry["error"]["code"] == code, entry
        assert entry["error"]["message"].startswith(f"Line {line}")
        assert entry["response"] is None
    assert by_line[6]["error"]["param"] == "body.messages"
    assert by_line[4]["custom_id"] == "ok-1" and by_line[2]["custom_id"] is None


def test_a_file_with_nothing_valid_fails_the_batch_with_errors_data(stack: Stack) -> None:
    client = sdk(stack)
    lines: list[dict[str, Any] | str] = [
        {"custom_id": "x"},
        "[1, 2]",
        chat_line("y", model="no-such-model"),
    ]
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
        ).id,
    )
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (1, "invalid_method"),
        (2, "invalid_line"),
        (3, "model_not_found"),
    ]
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.failed) == (3, 3)
    assert batch.output_file_id is None and job_rows(stack, batch.id) == {}


def test_cancel_mid_run_keeps_finished_lines_and_never_runs_queued_ones(stack: Stack) -> None:
    client = sdk(stack)
    # Well over the worker's bulk window (engine slots for bulk + the lines it keeps claimed
    # at its gate: 16 + 32 here), so lines are still unsent when the cancel comes.
    lines = [
        chat_line(
            f"q{i}",
            f"Write a long story number {i}.",
            max_tokens=4 if i < 4 else 400,
            temperature=0.9,
            seed=i,
            ignore_eos=i >= 4,
        )
        for i in range(160)
    ]
    before = _ended(stack)
    batch_id = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
    ).id

    def some_done_some_running() -> bool:
        rows = job_rows(stack, batch_id).values()
        return any(s == "succeeded" for s, _, _ in rows) and any(s == "running" for s, _, _ in rows)

    wait_until(some_done_some_running, 180, "finished and running lines")
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")
    started_at_cancel = {
        cid for cid, (_, attempts, _) in job_rows(stack, batch_id).items() if attempts > 0
    }
    batch = wait_batch(client, batch_id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    rows = job_rows(stack, batch_id)
    # Nothing started after the cancel: queued lines never ran.
    assert {cid for cid, (_, attempts, _) in rows.items() if attempts > 0} == started_at_cancel
    assert len(started_at_cancel) < len(lines)
    output = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    done = {cid for cid, (status, _, _) in rows.items() if status == "succeeded"}
    assert {o["custom_id"] for o in output} == done and done
    assert batch.request_counts is not None and batch.request_counts.completed == len(done)
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert sorted([o["custom_id"] for o in output] + [e["custom_id"] for e in errors]) == sorted(
        line["custom_id"] for line in lines
    )
    with stack.client() as http:
        assert_error(http.post(f"/v1/batches/{batch_id}/cancel"), 409, "batch_not_cancellable")
    # Each line's end counted once in /metrics: by the cancel, or by its worker.
    after = _ended(stack)
    cancelled = sum(1 for status, _, _ in rows.values() if status == "cancelled")
    assert after["cancelled"] - before["cancelled"] == cancelled
    assert after["succeeded"] - before["succeeded"] == len(done)


def _ended(stack: Stack) -> dict[str, float]:
    """`ferry_jobs_ended_total` of the tiny model by status, from an API's /metrics."""
    page = httpx.get(f"{stack.url}/metrics", timeout=30).text
    ended = {"cancelled": 0.0, "succeeded": 0.0}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "ferry_jobs_ended_total" and sample.labels["model"] == TINY:
                ended[sample.labels["status"]] = sample.value
    return ended


def test_completion_window_passes_and_the_batch_expires(stack: Stack) -> None:
    client = sdk(stack)
    lines = [
        chat_line(
            f"e{i}", max_tokens=4 if i < 3 else 1000, temperature=0.9, seed=i, ignore_eos=i >= 3
        )
        for i in range(200)
    ]
    batch_id = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="8s"
    ).id
    batch = wait_batch(client, batch_id, timeout=120)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.expired_at >= batch.created_at + 8
    output = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    assert {"e0", "e1", "e2"} <= {o["custom_id"] for o in output}
    assert errors and all(e["error"]["code"] == "batch_expired" for e in errors)
    assert len(output) + len(errors) == 200
    assert all(
        status in ("succeeded", "cancelled") for status, _, _ in job_rows(stack, batch_id).values()
    )
