"""Batches end to end, driven by the official `openai` SDK: upload a JSONL file, create a
batch, poll it, download and parse its output and error files; bad lines, bad input,
cancel, expiry. On the session stack (two API processes, a vLLM worker, PostgreSQL,
Redis, moto S3)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from openai import OpenAI
from openai.types import Batch, Completion
from openai.types.chat import ChatCompletion

from ferry_testing.procs import wait_until
from tests.conftest import KEY_A, KEY_B, TINY, Stack, open_stack
from tests.helpers import assert_error

pytestmark = pytest.mark.timeout(900)
CHAT = "/v1/chat/completions"
ENDED = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, content: str = "Say something.", *, model: str = TINY,
              max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": content}], **body}}


def jsonl(lines: list[dict[str, Any] | str]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()


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
        rows = conn.execute("SELECT custom_id, status, attempts, finished_at FROM jobs "
                            "WHERE batch_id = %s", (batch_id,)).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_openai_sdk_drives_a_chat_batch(stack: Stack) -> None:
    client = sdk(stack)
    lines = [chat_line(f"req-{i}", f"Tell me about {i}.", max_tokens=4 + i % 5)
             for i in range(24)]
    input_id = upload(client, jsonl(lines))
    created = client.batches.create(input_file_id=input_id, endpoint=CHAT,
                                    completion_window="24h", metadata={"run": "sdk"})
    assert created.status == "validating" and created.metadata == {"run": "sdk"}
    batch = wait_batch(client, created.id)

    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (24, 24, 0)
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
                "bulk", batch.id, out["custom_id"])
        # GET /v1/jobs: `batch_id` lists the batch's lines (pages of 10), `lane` tells
        # them from interactive jobs.
        listed, after = [], None
        while True:
            page = http.get("/v1/jobs", params={"batch_id": batch.id, "limit": 10,
                                                **({"after": after} if after else {})}).json()
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
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": TINY, "prompt": f"Once upon a time {i}", "max_tokens": 6,
                       "temperature": 0}} for i in range(3)]
    input_id = upload(client, jsonl(lines))
    batch = wait_batch(client, client.batches.create(
        input_file_id=input_id, endpoint="/v1/completions", completion_window="24h").id)
    assert batch.status == "completed", batch
    output = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == ["c0", "c1", "c2"]
    for out in output:
        body = Completion.model_validate(out["response"]["body"])
        assert body.object == "text_completion" and body.choices[0].text


def test_bad_lines_go_to_the_error_file_with_line_numbers(stack: Stack) -> None:
    client = sdk(stack)
    lines: list[dict[str, Any] | str] = [
        chat_line("ok-1"),                                          # 1
        "this is not json",                                         # 2
        {"method": "POST", "url": CHAT, "body": {}},                # 3 no custom_id
        chat_line("ok-1"),                                          # 4 repeated custom_id
        {**chat_line("wrong-url"), "url": "/v1/completions"},       # 5
        {"custom_id": "no-messages", "method": "POST", "url": CHAT,
         "body": {"model": TINY}},                                  # 6
        chat_line("no-model", model="no-such-model"),               # 7
        {**chat_line("get"), "method": "GET"},                      # 8
        "",                                                         # 9 blank: skipped
        chat_line("too-long", max_tokens=10**6),                    # 10
        chat_line("ok-2"),                                          # 11
    ]
    batch = wait_batch(client, client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT,
        completion_window="24h").id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (10, 2, 8)
    assert [o["custom_id"] for o in read_jsonl(client, batch.output_file_id)] == \
        ["ok-1", "ok-2"]
    errors = read_jsonl(client, batch.error_file_id)
    by_line = {e["error"]["line"]: e for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 10]
    expected = {2: "invalid_json", 3: "missing_custom_id", 4: "duplicate_custom_id",
                5: "url_mismatch", 6: "invalid_body", 7: "model_not_found",
                8: "invalid_method", 10: "context_length_exceeded"}
    for line, code in expected.items():
        entry = by_line[line]
        assert entry["error"]["code"] == code, entry
        assert entry["error"]["message"].startswith(f"Line {line}")
        assert entry["response"] is None
    assert by_line[6]["error"]["param"] == "body.messages"
    assert by_line[4]["custom_id"] == "ok-1" and by_line[2]["custom_id"] is None


def test_a_file_with_nothing_valid_fails_the_batch_with_errors_data(stack: Stack) -> None:
    client = sdk(stack)
    lines: list[dict[str, Any] | str] = [{"custom_id": "x"}, "[1, 2]",
                                         chat_line("y", model="no-such-model")]
    batch = wait_batch(client, client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT,
        completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (1, "invalid_method"), (2, "invalid_line"), (3, "model_not_found")]
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.failed) == (3, 3)
    assert batch.output_file_id is None and job_rows(stack, batch.id) == {}


def test_bad_input_is_refused_and_nothing_is_stored(stack: Stack) -> None:
    valid = jsonl([chat_line("a")])
    with stack.client() as http:
        files_before = http.get("/v1/files", params={"limit": 10_000}).json()["data"]
        batches_before = http.get("/v1/batches", params={"limit": 100}).json()["data"]

        def post_file(data: bytes, purpose: str = "batch") -> httpx.Response:
            return http.post("/v1/files", data={"purpose": purpose},
                             files={"file": ("in.jsonl", data, "application/jsonl")})

        assert_error(post_file(valid, purpose="fine-tune"), 400, "invalid_purpose")
        assert_error(post_file(b"name,age\nbob,3\n"), 400, "invalid_file_format")
        assert_error(post_file(b""), 400, "empty_file")
        assert_error(post_file(b"\n  \n"), 400, "empty_file")
        assert_error(post_file(b"{}\n" * 50_001), 400, "too_many_lines")
        assert_error(http.post("/v1/files", data={"purpose": "batch"}), 400)
        assert http.get("/v1/files", params={"limit": 10_000}).json()["data"] == files_before

        good = post_file(valid).json()["id"]
        completions_file = post_file(jsonl([{**chat_line("a"), "url": "/v1/completions"}]))

        def create(**body: Any) -> httpx.Response:
            return http.post("/v1/batches", json={"input_file_id": good, "endpoint": CHAT,
                                                  "completion_window": "24h", **body})

        assert_error(create(input_file_id="file-nope"), 404, "not_found")
        with stack.client(KEY_B) as other:
            error = assert_error(other.post("/v1/batches", json={
                "input_file_id": good, "endpoint": CHAT, "completion_window": "24h"}), 404)
            assert error["param"] == "input_file_id"
            assert_error(other.get(f"/v1/files/{good}/content"), 404)
        assert_error(create(endpoint="/v1/embeddings"), 400, "unsupported_endpoint")
        assert_error(create(input_file_id=completions_file.json()["id"]), 400,
                     "endpoint_mismatch")
        assert_error(create(completion_window="soon"), 400, "invalid_completion_window")
        assert_error(create(completion_window="400d"), 400, "invalid_completion_window")
        assert_error(create(metadata={str(i): "v" for i in range(17)}), 400)
        assert http.get("/v1/batches", params={"limit": 100}).json()["data"] == batches_before
        assert_error(http.get("/v1/batches/batch_nope"), 404)
        assert_error(http.post("/v1/batches/batch_nope/cancel"), 404)


def test_upload_limits_come_from_settings(stack: Stack, logs: Path) -> None:
    from ferry_testing.procs import start_api

    proc, url = start_api("batch-limits-api", {
        **stack.env, "FERRY_BATCH_MAX_FILE_BYTES": "2000", "FERRY_BATCH_MAX_LINES": "5",
    }, logs)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            def post_file(data: bytes) -> httpx.Response:
                return http.post("/v1/files", data={"purpose": "batch"},
                                 files={"file": ("in.jsonl", data, "application/jsonl")})

            line = json.dumps(chat_line("a")).encode() + b"\n"
            assert post_file(line * 5).status_code == 200
            assert_error(post_file(line * 6), 400, "too_many_lines")
            big = json.dumps(chat_line("a", content="x" * 3000)).encode() + b"\n"
            assert_error(post_file(big), 413, "file_too_large")
            # Over the multipart body bound too: refused before it is read whole.
            assert_error(post_file(b"x" * (2 * 1024 * 1024)), 413)
    finally:
        proc.stop()


def test_file_lifecycle(stack: Stack) -> None:
    client = sdk(stack)
    data = jsonl([chat_line("a"), chat_line("b")])
    file_id = upload(client, data, "mine.jsonl")
    info = client.files.retrieve(file_id)
    assert (info.filename, info.bytes, info.purpose) == ("mine.jsonl", len(data), "batch")
    assert client.files.content(file_id).content == data
    deleted = client.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with stack.client() as http:
        assert_error(http.get(f"/v1/files/{file_id}"), 404)
        assert_error(http.get(f"/v1/files/{file_id}/content"), 404)
        assert_error(http.delete(f"/v1/files/{file_id}"), 404)


def test_cancel_mid_run_keeps_finished_lines_and_never_runs_queued_ones(stack: Stack) -> None:
    client = sdk(stack)
    # Well over the worker's bulk window (engine slots for bulk + the lines it keeps claimed
    # at its gate: 16 + 32 here), so lines are still unsent when the cancel comes.
    lines = [chat_line(f"q{i}", f"Write a long story number {i}.", max_tokens=4 if i < 4 else 400,
                       temperature=0.9, seed=i, ignore_eos=i >= 4) for i in range(160)]
    batch_id = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=CHAT,
                                     completion_window="24h").id

    def some_done_some_running() -> bool:
        rows = job_rows(stack, batch_id).values()
        return (any(s == "succeeded" for s, _, _ in rows)
                and any(s == "running" for s, _, _ in rows))

    wait_until(some_done_some_running, 180, "finished and running lines")
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")
    started_at_cancel = {cid for cid, (_, attempts, _) in job_rows(stack, batch_id).items()
                         if attempts > 0}
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
    assert sorted([o["custom_id"] for o in output] + [e["custom_id"] for e in errors]) == \
        sorted(line["custom_id"] for line in lines)
    with stack.client() as http:
        assert_error(http.post(f"/v1/batches/{batch_id}/cancel"), 409,
                     "batch_not_cancellable")


def test_completion_window_passes_and_the_batch_expires(stack: Stack) -> None:
    client = sdk(stack)
    lines = [chat_line(f"e{i}", max_tokens=4 if i < 3 else 1000, temperature=0.9, seed=i,
                        ignore_eos=i >= 3)
             for i in range(200)]
    batch_id = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=CHAT,
                                     completion_window="8s").id
    batch = wait_batch(client, batch_id, timeout=120)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.expired_at >= batch.created_at + 8
    output = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    assert {"e0", "e1", "e2"} <= {o["custom_id"] for o in output}
    assert errors and all(e["error"]["code"] == "batch_expired" for e in errors)
    assert len(output) + len(errors) == 200
    assert all(status in ("succeeded", "cancelled")
               for status, _, _ in job_rows(stack, batch_id).values())


def test_worker_sigkill_and_api_restart_mid_batch_give_each_custom_id_exactly_once(
    own_database: str, model_cache: Path, logs: Path, s3_url: str
) -> None:
    model = "tiny-batch-recovery"
    with open_stack(own_database, 15, model_cache, s3_url) as own:
        own.add_api("batch-api-1", logs)
        worker = own.add_worker("batch-worker-1", model, "transformers", logs)
        lines = [chat_line(f"k{i}", f"Tell story {i}.", model=model, max_tokens=64)
                 for i in range(40)]
        client = sdk(own)
        batch_id = client.batches.create(input_file_id=upload(client, jsonl(lines)),
                                         endpoint=CHAT, completion_window="24h").id

        def some_done_some_running() -> bool:
            statuses = [s for s, _, _ in job_rows(own, batch_id).values()]
            return statuses.count("succeeded") >= 5 and "running" in statuses

        wait_until(some_done_some_running, 300, "finished and running lines")
        worker.kill()
        # The API goes too (SIGKILL), and a new one takes over from what is in SQL.
        old_api = own.procs[0]
        old_api.kill()
        own.api_urls.remove(own.api_urls[0])
        own.add_api("batch-api-2", logs)
        before = {cid: row for cid, row in job_rows(own, batch_id).items()
                  if row[0] == "succeeded"}
        interrupted = {cid for cid, row in job_rows(own, batch_id).items() if row[0] == "running"}
        assert interrupted
        own.add_worker("batch-worker-2", model, "transformers", logs)
        batch = wait_batch(sdk(own), batch_id, timeout=600)
        after = job_rows(own, batch_id)
        output = read_jsonl(sdk(own), batch.output_file_id)

    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.completed == 40
    # Every custom_id exactly once, in input order; none in an error file.
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
    assert batch.error_file_id is None
    # Lines that had succeeded were never generated again...
    assert all(after[cid] == row for cid, row in before.items())
    # ...and the lines the dead worker was running ran again, to success.
    assert all(after[cid][0] == "succeeded" and after[cid][1] >= 2 for cid in interrupted)


def test_api_killed_mid_expansion_another_takes_the_batch_over(
    own_database: str, model_cache: Path, logs: Path, s3_url: str
) -> None:
    model = "tiny-batch-expansion"
    lines = [chat_line(f"x{i}", model=model) for i in range(20_000)]
    with open_stack(own_database, 15, model_cache, s3_url) as own:
        own.env["FERRY_BATCH_EXPAND_LEASE_SECONDS"] = "3"
        # The model is known (as a worker would announce it) but nothing runs it: the
        # lines stay queued, which is all this test looks at.
        own.redis().hset("ferry:models", model, json.dumps(
            {"name": model, "max_model_len": 2048, "engine": "vllm", "created": 0}))
        own.add_api("expand-api-1", logs)
        client = sdk(own)
        batch_id = client.batches.create(input_file_id=upload(client, jsonl(lines)),
                                         endpoint=CHAT, completion_window="24h").id
        time.sleep(1.0)
        assert client.batches.retrieve(batch_id).status == "validating"
        own.procs[0].kill()
        own.api_urls.remove(own.api_urls[0])
        assert job_rows(own, batch_id) == {}  # its expansion's transaction never committed
        own.add_api("expand-api-2", logs)
        client = sdk(own)
        wait_until(lambda: client.batches.retrieve(batch_id).status != "validating", 300,
                   "the batch to be expanded by the new API process")
        batch = client.batches.retrieve(batch_id)
        rows = job_rows(own, batch_id)
    assert batch.status == "in_progress"
    assert batch.request_counts is not None and batch.request_counts.total == 20_000
    assert sorted(rows) == sorted(line["custom_id"] for line in lines)


def test_a_batch_is_finalised_when_its_last_line_ends_not_on_the_timer(
    own_database: str, model_cache: Path, logs: Path, s3_url: str
) -> None:
    """With the supervisor's timed pass an hour away, a batch still completes: the wake
    its last line sends finalises it, also while another batch of the database has lines
    left to send (in a whole-module run, the expansion test's 20,000 lines that no worker
    takes)."""
    model = "tiny-batch-finalise"
    lines = [chat_line(f"f{i}", f"Line {i}.", model=model, max_tokens=4) for i in range(6)]
    with open_stack(own_database, 15, model_cache, s3_url) as own:
        own.env["FERRY_BATCH_FEED_INTERVAL_SECONDS"] = "3600"
        own.add_api("finalise-api", logs)
        own.add_worker("finalise-worker", model, "transformers", logs)
        client = sdk(own)
        batch_id = client.batches.create(input_file_id=upload(client, jsonl(lines)),
                                         endpoint=CHAT, completion_window="24h").id
        batch = wait_batch(client, batch_id, timeout=120)
        output = read_jsonl(client, batch.output_file_id)
    assert batch.status == "completed", batch
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
