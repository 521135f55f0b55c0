"""One job's whole journey: API -> SQL -> Celery -> the vLLM engine -> Redis -> SSE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from httpx_sse import connect_sse

from ferry_testing.procs import ROOT, wait_until
from tests.conftest import KEY_A, KEY_B, TINY, Stack
from tests.helpers import (
    assert_error,
    chat_body,
    read_events,
    submit,
    text_of,
    wait_job,
)

pytestmark = pytest.mark.timeout(900)


def test_submit_poll_result(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=16, temperature=0, metadata={"k": "v"}))
        assert job["status"] == "queued"
        assert job["metadata"] == {"k": "v"}
        final = wait_job(client, job["id"])
    assert final["status"] == "succeeded", final
    assert final["result"]["text"]
    assert final["result"]["finish_reason"] in ("stop", "length")
    usage = final["usage"]
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert final["attempts"] == 1
    assert final["created_at"] <= final["started_at"] <= final["first_token_at"]
    assert final["first_token_at"] <= final["finished_at"]
    assert final["timings"]["ttft_seconds"] is not None


def test_sse_in_order_and_equal_to_result(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=48, temperature=0.8, seed=3))
        events = read_events(client, job["id"])
        final = wait_job(client, job["id"])
    orders = [e.order for e in events]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    assert [e.order[1] for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events[-2:]] == ["usage", "done"]
    assert all(e.type == "delta" for e in events[:-2])
    assert text_of(events) == final["result"]["text"]
    assert events[-2].data["completion_tokens"] == final["usage"]["completion_tokens"]


def test_reconnect_with_last_event_id_on_another_api(stack: Stack) -> None:
    first_api, second_api = stack.api_urls[:2]
    with stack.client(url=first_api) as one, stack.client(url=second_api) as two:
        job = submit(one, chat_body(TINY, max_tokens=300))
        # Leave after the first delta (the worker may coalesce text into few events).
        head = read_events(one, job["id"], limit=1)
        assert [e.type for e in head] == ["delta"]
        rest = read_events(two, job["id"], last_event_id=head[-1].id)
        everything = read_events(two, job["id"])  # a full replay, after the end
        final = wait_job(two, job["id"])
    assert [e.id for e in head + rest] == [e.id for e in everything]
    assert text_of(head + rest) == final["result"]["text"]


def test_replay_after_stream_expired_comes_from_sql(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=24))
        from_redis = read_events(client, job["id"])
        # What the TTL does after an hour: the stream is gone, SQL remains.
        assert stack.redis().delete(f"ferry:job:{job['id']}:events") == 1
        from_sql = read_events(client, job["id"])
        middle = len(from_redis) // 2
        tail_from_sql = read_events(client, job["id"], last_event_id=from_redis[middle].id)
    assert len(from_redis) >= 3  # at least one delta, usage, done
    strip = [(e.id, e.type, e.data.get("text")) for e in from_redis]
    assert [(e.id, e.type, e.data.get("text")) for e in from_sql] == strip
    assert [e.id for e in tail_from_sql] == [e.id for e in from_redis[middle + 1 :]]


def test_cancel_running_job_aborts_it_in_the_engine(stack: Stack) -> None:
    with stack.client() as client:
        # ignore_eos: the job is still running when the cancel lands (sampled, the tiny model
        # could end early on an end token).
        job = submit(client, chat_body(TINY, max_tokens=2000, ignore_eos=True))
        wait_until(
            lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running",
            30,
            "the job to start",
            interval=0.02,
        )
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        events = read_events(client, job["id"])
        final = wait_job(client, job["id"])
        again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert events[-1].type == "cancelled"
    assert final["status"] == "cancelled"
    # Aborted well before its 2000 tokens, and the partial output is kept.
    assert final["usage"]["completion_tokens"] < 2000
    assert final["result"]["text"] == text_of(events)
    assert_error(again, 409, "job_finished")


def test_key_isolation_on_every_job_route(stack: Stack) -> None:
    with stack.client() as owner, stack.client(KEY_B) as other:
        job = submit(owner, chat_body(TINY, max_tokens=4))
        job_id = job["id"]
        assert_error(other.get(f"/v1/jobs/{job_id}"), 404, "not_found")
        assert_error(other.post(f"/v1/jobs/{job_id}/cancel"), 404, "not_found")
        assert_error(other.get(f"/v1/jobs/{job_id}/events"), 404, "not_found")
        assert job_id not in [j["id"] for j in other.get("/v1/jobs?limit=100").json()["data"]]
        assert job_id in [j["id"] for j in owner.get("/v1/jobs?limit=100").json()["data"]]
        wait_job(owner, job_id)


def test_list_jobs_paginates_and_filters(stack: Stack) -> None:
    with stack.client(KEY_B) as client:
        ids = [submit(client, chat_body(TINY, max_tokens=2))["id"] for _ in range(5)]
        for job_id in ids:
            wait_job(client, job_id)
        page1 = client.get("/v1/jobs", params={"limit": 3}).json()
        page2 = client.get("/v1/jobs", params={"limit": 3, "after": page1["last_id"]}).json()
        succeeded = client.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()
        cancelled = client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()
    seen = [j["id"] for j in page1["data"] + page2["data"]]
    assert seen[:5] == list(reversed(ids))  # newest first, no overlap between pages
    assert page1["has_more"] is True
    assert set(ids) <= {j["id"] for j in succeeded["data"]}
    assert not set(ids) & {j["id"] for j in cancelled["data"]}


def test_chat_completion_non_streaming(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json=chat_body(TINY, max_tokens=12))
        assert response.status_code == 200, response.text
        body = response.json()
        job = client.get(f"/v1/jobs/{body['id']}").json()
    assert body["object"] == "chat.completion"
    # reasoning_content is null unless thinking is on (FastDeploy's shape).
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "reasoning_content": None,
        "content": job["result"]["text"],
        "tool_calls": [],
    }
    assert body["usage"]["completion_tokens"] == job["usage"]["completion_tokens"]


def test_chat_completion_streaming_openai_chunks(stack: Stack) -> None:
    body = chat_body(TINY, max_tokens=20, stream=True, stream_options={"include_usage": True})
    with stack.client() as client:
        lines = []
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        job_id = response.headers["x-ferry-job-id"]
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == job_id for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == job["result"]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == job["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_client_that_leaves_cancels_its_job(stack: Stack) -> None:
    body = chat_body(TINY, max_tokens=2000, ignore_eos=True, stream=True)
    with stack.client() as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            job_id = response.headers["x-ferry-job-id"]
            next(response.iter_lines())  # the role chunk: the job is accepted; now leave
        final = wait_job(client, job_id)
    assert final["status"] == "cancelled"
    assert final["usage"] is None or final["usage"]["completion_tokens"] < 2000


def test_concurrent_jobs_share_the_engine(stack: Stack) -> None:
    """16 jobs submitted together all finish, and (nearly) all run at the same moment:
    the worker's threads feed one engine, which batches them."""
    with stack.client() as client, ThreadPoolExecutor(16) as pool:
        # Submitted together (not one after another): a random model's replies can end in
        # well under a second, so sequential submits would measure submit latency instead.
        jobs = list(
            pool.map(
                lambda i: submit(
                    client, chat_body(TINY, f"story {i}", max_tokens=400, ignore_eos=True, seed=i)
                ),
                range(16),
            )
        )
        finals = [wait_job(client, j["id"]) for j in jobs]
    assert all(f["status"] == "succeeded" for f in finals)
    # ignore_eos reached the engine: every job ran to its limit.
    assert all(
        f["usage"]["completion_tokens"] == 400 and f["result"]["finish_reason"] == "length"
        for f in finals
    )
    edges = sorted(
        [(f["started_at"], 1) for f in finals] + [(f["finished_at"], -1) for f in finals]
    )
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most >= 12, most


def test_models_health_metrics(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=4))
        assert wait_job(client, job["id"])["status"] == "succeeded"
        models = client.get("/v1/models").json()
        health = client.get("/health")
        metrics = client.get("/metrics").text
    card = next(m for m in models["data"] if m["id"] == TINY)
    assert card["object"] == "model" and card["max_model_len"] > 0 and card["workers"] >= 1
    assert card["engine"] == "vllm"
    assert health.status_code == 200
    assert health.json()["database"] == "ok" and health.json()["redis"] == "ok"
    assert any(w["model"] == TINY for w in health.json()["workers"])
    # Counted as jobs end (tests/test_metrics.py checks the values).
    assert f'ferry_jobs_ended_total{{model="{TINY}",status="succeeded"}}' in metrics
    assert f'ferry_tokens_generated_total{{model="{TINY}"}}' in metrics
    assert f'ferry_time_to_first_token_seconds_bucket{{le="0.1",model="{TINY}"}}' in metrics
    assert f'ferry_queue_depth{{queue="{TINY}.interactive"}}' in metrics


def test_many_subscribers_get_the_same_stream(stack: Stack) -> None:
    """Several SSE clients on one API process share its single pub/sub connection."""
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=64))
        results: list[list[str]] = []

        def follow() -> None:
            with (
                stack.client() as own,
                connect_sse(own, "GET", f"/v1/jobs/{job['id']}/events") as source,
            ):
                results.append([s.id for s in source.iter_sse() if s.data])

        threads = [threading.Thread(target=follow) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        final = wait_job(client, job["id"])
    assert final["status"] == "succeeded"
    assert len(results) == 6 and all(r == results[0] for r in results)


@pytest.mark.parametrize("stream", [False, True])
def test_ferry_submit_prints_the_answer(stack: Stack, stream: bool) -> None:
    args = [
        sys.executable,
        "-m",
        "cli.main",
        "submit",
        "Hello there",
        "--max-tokens",
        "12",
        "--model",
        TINY,
        "--server",
        stack.url,
        "--api-key",
        KEY_A,
    ]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        args + (["--stream"] if stream else []), cwd=ROOT, timeout=120, capture_output=True, env=env
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stderr.decode().split()[1]
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    # The answer, then the newline print() ends it with.
    assert done.stdout.decode("utf-8") == job["result"]["text"] + "\n"


def test_without_max_tokens_the_answer_may_fill_the_context(stack: Stack) -> None:
    """No max_tokens: none is stored, and the engine lets the answer run to the end of the
    model's context (the stack caps it at 2,048 tokens), as vLLM and OpenAI do."""
    from tests.test_conversations import stored_job

    with stack.client() as client:
        job = submit(client, chat_body(TINY, "Fill it.", temperature=0, ignore_eos=True))
        final = wait_job(client, job["id"], timeout=300)
        (card,) = [m for m in client.get("/v1/models").json()["data"] if m["id"] == TINY]
    request, _ = stored_job(stack.database_url, job["id"])
    assert "max_tokens" not in request
    assert final["status"] == "succeeded", final
    assert final["result"]["finish_reason"] == "length"
    assert card["max_model_len"] == 2048
    assert final["usage"]["total_tokens"] == card["max_model_len"]
