"""Batches across failures, each on a deployment of its own: a worker killed and the API
restarted mid-batch, an API killed mid-expansion, and finalising when the last line
ends."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ferry_testing.procs import wait_until
from tests.batching import CHAT, chat_line, job_rows, jsonl, read_jsonl, sdk, upload, wait_batch
from tests.conftest import open_stack

pytestmark = pytest.mark.timeout(900)


def test_worker_sigkill_and_api_restart_mid_batch_give_each_custom_id_exactly_once(
    own_database: str, model_cache: Path, logs: Path, s3_url: str
) -> None:
    model = "tiny-batch-recovery"
    with open_stack(own_database, 15, model_cache, s3_url) as own:
        own.add_api("batch-api-1", logs)
        worker = own.add_worker("batch-worker-1", model, "transformers", logs)
        lines = [
            chat_line(f"k{i}", f"Tell story {i}.", model=model, max_tokens=64) for i in range(40)
        ]
        client = sdk(own)
        batch_id = client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
        ).id

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
        before = {cid: row for cid, row in job_rows(own, batch_id).items() if row[0] == "succeeded"}
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
        own.redis().hset(
            "ferry:models",
            model,
            json.dumps({"name": model, "max_model_len": 2048, "engine": "vllm", "created": 0}),
        )
        own.add_api("expand-api-1", logs)
        client = sdk(own)
        batch_id = client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
        ).id
        time.sleep(1.0)
        assert client.batches.retrieve(batch_id).status == "validating"
        own.procs[0].kill()
        own.api_urls.remove(own.api_urls[0])
        assert job_rows(own, batch_id) == {}  # its expansion's transaction never committed
        own.add_api("expand-api-2", logs)
        client = sdk(own)
        wait_until(
            lambda: client.batches.retrieve(batch_id).status != "validating",
            300,
            "the batch to be expanded by the new API process",
        )
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
        batch_id = client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
        ).id
        batch = wait_batch(client, batch_id, timeout=120)
        output = read_jsonl(client, batch.output_file_id)
    assert batch.status == "completed", batch
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
