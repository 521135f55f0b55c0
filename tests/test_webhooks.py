"""Signed webhooks: a receiver on loopback gets each job's and batch's events, signed as
Standard Webhooks specifies (checked with the `standardwebhooks` package), durably: retried
under the same id and bytes, across an API restart, and never held up by a slow receiver.

The API runs in process on its own database (loopback allowed in its settings, backoff
shortened); a job's start and end are recorded by the same repository calls a worker makes
(`claim_job`, `finish_job`), or by cancelling it through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from redis import Redis
from sqlalchemy import func, select
from standardwebhooks import Webhook

from api.core.settings import ApiSettings
from api.core.state import AppState
from api.webhooks import urls
from storage.db import create_db_engine, create_session_factory
from storage.keys import MODELS_HASH
from storage.models import Batch, Job, JobStatus, WebhookDelivery, utcnow
from storage.registry import ServedModel, now_epoch
from storage.repositories import api_keys
from storage.repositories import jobs as jobs_repo
from storage.repositories import webhooks as webhooks_repo
from storage.settings import StorageSettings
from tests.batching import chat_line, jsonl
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, TINY, Sessions, new_database, open_stack
from tests.fixtures.api import InProcessApi, running_api

pytestmark = pytest.mark.timeout(120)

REDIS_URL = f"{REDIS_BASE}/6"  # shared with test_catalog.py, which runs apart from this


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1: records every POST; per path, the statuses to answer
    in turn (then 200) and a delay before answering."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.received.append(
                    Received(self.path, dict(self.headers.items()), body, time.monotonic())
                )
                queued = rec.statuses.get(self.path) or []
                status = queued.pop(0) if queued else 200
            time.sleep(rec.delays.get(self.path, 0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def hooks_database() -> Iterator[str]:
    with Redis.from_url(REDIS_URL) as client:
        client.flushdb()
        tiny = ServedModel(TINY, 2048, "vllm", created=now_epoch(), root=TINY)
        client.hset(MODELS_HASH, tiny.name, tiny.to_json())
    with new_database("ferry_test_hooks") as url:
        yield url


def hook_settings(**overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {
        "api_keys": [KEY_A, KEY_B],
        "webhook_allow_networks": ["127.0.0.1/32"],
        "webhook_retry_base_seconds": 0.3,
        "webhook_retry_max_seconds": 1.0,
        "webhook_poll_seconds": 0.2,
        **overrides,
    }
    return ApiSettings(**values)


@pytest.fixture
async def api(hooks_database: str, tmp_path: Path) -> AsyncIterator[InProcessApi]:
    async with running_api(hooks_database, REDIS_URL, tmp_path, hook_settings()) as running:
        yield running


def state_of(api: InProcessApi) -> AppState:
    state: AppState = api.app.state.ferry
    return state


async def secret_of(api: InProcessApi, token: str = KEY_A) -> str:
    async with state_of(api).db.transaction() as session:
        key = await api_keys.find_key(session, token)
        assert key is not None
        return await api_keys.webhook_secret(session, key.id)


async def wait_for(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def verified(secret: str, message: Received) -> dict[str, Any]:
    """The body, after the package checks its signature (raises if it does not match)."""
    body: dict[str, Any] = Webhook(secret).verify(message.body, message.headers)
    return body


def job_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": TINY,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}],
        **extra,
    }


async def submit(client: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json=job_body(**extra))
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def deliveries(api: InProcessApi, object_id: str) -> list[WebhookDelivery]:
    async with state_of(api).db.read() as session:
        return await webhooks_repo.list_for_object(session, object_id)


# -- events -----------------------------------------------------------------------------


async def test_job_start_and_completed_are_signed_and_carry_the_job(
    api: InProcessApi, receiver: Receiver
) -> None:
    secret = await secret_of(api)
    assert secret.startswith("whsec_")
    async with api.client() as client:
        job = await submit(client, webhook=receiver.url("/job"))
        assert job["webhook"] == receiver.url("/job")
        assert job["webhook_events_filter"] is None
        # As a worker does: the claim announces the start...
        async with state_of(api).db.transaction() as session:
            claimed = await jobs_repo.claim_job(session, job["id"], "worker-test", 30)
        assert claimed is not None
        await wait_for(lambda: len(receiver.at("/job")) == 1)
        start = verified(secret, receiver.at("/job")[0])
        assert start["id"] == job["id"] and start["status"] == "running"
        # ...and the end, in the transaction that records it, the completion.
        outcome = jobs_repo.JobOutcome(
            status=JobStatus.SUCCEEDED,
            deltas=["Hi", " there"],
            finish_reason="stop",
            prompt_tokens=5,
            completion_tokens=2,
            first_token_at=utcnow(),
            started_at=claimed.started_at,
        )
        async with state_of(api).db.transaction() as session:
            assert await jobs_repo.finish_job(session, job["id"], "worker-test", outcome)
        await wait_for(lambda: len(receiver.at("/job")) == 2)
        end_message = receiver.at("/job")[1]
        completed = verified(secret, end_message)
        # The body is the job exactly as GET shows it.
        shown = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert completed == shown
        assert completed["status"] == "succeeded" and completed["result"]["text"] == "Hi there"
    assert end_message.headers["Content-Type"] == "application/json"
    events = [m.headers["ferry-webhook-event"] for m in receiver.at("/job")]
    assert events == ["start", "completed"]
    ids = [m.headers["webhook-id"] for m in receiver.at("/job")]
    assert all(i.startswith("msg_") for i in ids) and len(set(ids)) == 2
    rows = await deliveries(api, job["id"])
    assert [(r.event, r.attempts, r.delivered_at is not None) for r in rows] == [
        ("start", 1, True),
        ("completed", 1, True),
    ]
    # Another key's secret does not verify these messages.
    with pytest.raises(Exception, match="signature"):
        verified(await secret_of(api, KEY_B), end_message)


async def test_cancelling_a_queued_job_sends_completed_only_when_filtered(
    api: InProcessApi, receiver: Receiver
) -> None:
    secret = await secret_of(api)
    async with api.client() as client:
        job = await submit(
            client, webhook=receiver.url("/cancel"), webhook_events_filter=["completed"]
        )
        assert job["webhook_events_filter"] == ["completed"]
        # The filter leaves the start out.
        async with state_of(api).db.transaction() as session:
            assert await jobs_repo.claim_job(session, job["id"], "worker-test", 30) is not None
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        await wait_for(lambda: len(receiver.at("/cancel")) == 1)
        body = verified(secret, receiver.at("/cancel")[0])
        assert body["id"] == job["id"] and body["status"] == "cancelled"
        await asyncio.sleep(0.6)  # a few deliverer passes: nothing else comes
    assert len(receiver.at("/cancel")) == 1
    assert [r.event for r in await deliveries(api, job["id"])] == ["completed"]


async def test_a_job_without_webhook_records_no_delivery(api: InProcessApi) -> None:
    async with api.client() as client:
        job = await submit(client)
        assert job["webhook"] is None
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    assert await deliveries(api, job["id"]) == []


# -- retries and durability ---------------------------------------------------------------


async def test_receiver_failing_twice_gets_the_same_message_a_third_time(
    api: InProcessApi, receiver: Receiver
) -> None:
    receiver.statuses["/flaky"] = [500, 503]
    secret = await secret_of(api)
    async with api.client() as client:
        job = await submit(
            client, webhook=receiver.url("/flaky"), webhook_events_filter=["completed"]
        )
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        await wait_for(lambda: len(receiver.at("/flaky")) == 3)
    messages = receiver.at("/flaky")
    assert len({m.headers["webhook-id"] for m in messages}) == 1
    assert len({m.body for m in messages}) == 1
    for message in messages:
        assert verified(secret, message)["status"] == "cancelled"
    # Backed off: the retries came after the base delay, not at once.
    assert messages[1].at - messages[0].at >= 0.2
    [row] = await deliveries(api, job["id"])
    for _ in range(50):
        if row.delivered_at is not None:
            break
        await asyncio.sleep(0.05)
        [row] = await deliveries(api, job["id"])
    assert row.attempts == 3 and row.delivered_at is not None and row.last_status == 200


async def test_delivery_survives_an_api_restart(
    hooks_database: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses["/restart"] = [500]
    # A long backoff: the first process stops before its retry is due.
    slow_retry = hook_settings(webhook_retry_base_seconds=3.0, webhook_retry_max_seconds=3.0)
    async with running_api(hooks_database, REDIS_URL, tmp_path, slow_retry) as first:
        secret = await secret_of(first)
        async with first.client() as client:
            job = await submit(
                client, webhook=receiver.url("/restart"), webhook_events_filter=["completed"]
            )
            assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        await wait_for(lambda: len(receiver.at("/restart")) == 1)
        await asyncio.sleep(0.3)  # its failed attempt recorded
    [row] = await deliveries_in(hooks_database, job["id"])
    assert row.attempts == 1 and row.delivered_at is None and row.last_status == 500
    async with running_api(hooks_database, REDIS_URL, tmp_path, slow_retry):
        await wait_for(lambda: len(receiver.at("/restart")) == 2)
    first_try, retry = receiver.at("/restart")
    assert retry.headers["webhook-id"] == first_try.headers["webhook-id"]
    assert retry.body == first_try.body
    assert verified(secret, retry)["id"] == job["id"]


async def settled(api: InProcessApi, object_id: str) -> WebhookDelivery:
    """The object's one message, once delivered or given up."""
    for _ in range(300):
        [row] = await deliveries(api, object_id)
        if row.delivered_at is not None or row.failed_at is not None:
            return row
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{object_id}: its message is still pending")


async def test_a_url_refused_at_delivery_is_given_up(api: InProcessApi) -> None:
    """The guard runs again at each attempt: a message whose URL now points somewhere
    private (as a DNS change would make it) is never sent, and given up at once."""
    async with api.client() as client:
        job = await submit(client)
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    async with state_of(api).db.transaction() as session:
        key = await api_keys.find_key(session, KEY_A)
        assert key is not None
        await webhooks_repo.record(
            session,
            [
                webhooks_repo.Announcement(
                    key.id, "https://10.20.30.40/hook", "job", job["id"], "completed"
                )
            ],
        )
    row = await settled(api, job["id"])
    assert row.failed_at is not None and row.delivered_at is None
    assert row.attempts == 1 and row.last_status is None
    assert row.last_error is not None and "private" in row.last_error


async def test_retries_stop_when_the_message_is_too_old(
    hooks_database: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses["/down"] = [500] * 100
    settings = hook_settings(webhook_max_age_seconds=1.5)
    async with running_api(hooks_database, REDIS_URL, tmp_path, settings) as api:
        async with api.client() as client:
            job = await submit(
                client, webhook=receiver.url("/down"), webhook_events_filter=["completed"]
            )
            assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        row = await settled(api, job["id"])
    assert row.failed_at is not None and row.delivered_at is None and row.last_status == 500
    # Tried until the age limit (the last try at it), not one more time.
    assert row.attempts == len(receiver.at("/down")) >= 2
    assert (row.failed_at - row.created_at).total_seconds() < 1.5 + 1.0


async def deliveries_in(database_url: str, object_id: str) -> list[WebhookDelivery]:
    engine = create_db_engine(StorageSettings(database_url=database_url, redis_url=REDIS_URL))
    try:
        async with create_session_factory(engine)() as session:
            return await webhooks_repo.list_for_object(session, object_id)
    finally:
        await engine.dispose()


async def test_a_slow_receiver_does_not_delay_another_delivery(
    hooks_database: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.delays["/slow"] = 10.0
    settings = hook_settings(webhook_timeout_seconds=15.0)
    async with (
        running_api(hooks_database, REDIS_URL, tmp_path, settings) as api,
        api.client() as client,
    ):
        slow = await submit(
            client, webhook=receiver.url("/slow"), webhook_events_filter=["completed"]
        )
        fast = await submit(
            client, webhook=receiver.url("/fast"), webhook_events_filter=["completed"]
        )
        await client.post(f"/v1/jobs/{slow['id']}/cancel")
        await wait_for(lambda: len(receiver.at("/slow")) == 1)
        began = time.monotonic()
        await client.post(f"/v1/jobs/{fast['id']}/cancel")
        await wait_for(lambda: len(receiver.at("/fast")) == 1, within=5)
        assert time.monotonic() - began < 3
        [slow_row] = await deliveries(api, slow["id"])
        assert slow_row.delivered_at is None  # still waiting on its receiver


async def test_the_due_messages_are_claimed_once_across_replicas(
    api: InProcessApi, receiver: Receiver
) -> None:
    """Two deliverers asking at once never hold the same message (FOR UPDATE SKIP LOCKED)."""
    state = state_of(api)
    # The two claimants below are the only ones: the app's own deliverer stops.
    await api.app.state.webhook_deliverer.stop()
    async with state.db.transaction() as session:
        key = await api_keys.find_key(session, KEY_A)
        assert key is not None
        await webhooks_repo.record(
            session,
            [
                webhooks_repo.Announcement(key.id, receiver.url("/x"), "job", f"job_x{i}", "start")
                for i in range(20)
            ],
        )

    async def claim() -> set[str]:
        async with state.db.transaction() as session:
            rows = await webhooks_repo.claim_due(session, limit=20, lease_seconds=60)
            await asyncio.sleep(0.2)  # hold the claim open while the other asks
            return {r.id for r in rows if r.object_id.startswith("job_x")}

    one, two = await asyncio.gather(claim(), claim())
    assert one.isdisjoint(two)
    assert len(one | two) == 20


# -- batches --------------------------------------------------------------------------------


async def upload_batch_file(client: httpx.AsyncClient, data: bytes) -> str:
    response = await client.post(
        "/v1/files",
        files={"file": ("input.jsonl", data, "application/jsonl")},
        data={"purpose": "batch"},
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


async def test_batch_cancelled_and_failed_webhooks(api: InProcessApi, receiver: Receiver) -> None:
    secret = await secret_of(api)
    async with api.client() as client:
        good = await upload_batch_file(client, jsonl([chat_line("a"), chat_line("b")]))
        response = await client.post(
            "/v1/batches",
            json={
                "input_file_id": good,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "webhook": receiver.url("/batch"),
            },
        )
        assert response.status_code == 200, response.text
        batch = response.json()
        assert batch["webhook"] == receiver.url("/batch")
        # Cancelled once its lines are jobs (queued: no worker here), it ends `cancelled`.
        for _ in range(200):
            shown = (await client.get(f"/v1/batches/{batch['id']}")).json()
            if shown["status"] == "in_progress":
                break
            await asyncio.sleep(0.05)
        assert shown["status"] == "in_progress"
        assert (await client.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 200
        await wait_for(lambda: len(receiver.at("/batch")) == 1, within=30)
        body = verified(secret, receiver.at("/batch")[0])
        assert body["id"] == batch["id"] and body["status"] == "cancelled"
        assert body == (await client.get(f"/v1/batches/{batch['id']}")).json()

        # Every line invalid: the batch fails, announced to a filter that asks for it.
        bad = await upload_batch_file(client, jsonl(["not json", "{}"]))
        response = await client.post(
            "/v1/batches",
            json={
                "input_file_id": bad,
                "endpoint": "/v1/chat/completions",
                "webhook": receiver.url("/failed"),
                "webhook_events_filter": ["failed"],
            },
        )
        assert response.status_code == 200, response.text
        failed_id = response.json()["id"]
        await wait_for(lambda: len(receiver.at("/failed")) == 1, within=30)
        body = verified(secret, receiver.at("/failed")[0])
        assert body["id"] == failed_id and body["status"] == "failed"
    assert [r.event for r in await deliveries(api, batch["id"])] == ["cancelled"]
    assert [r.event for r in await deliveries(api, failed_id)] == ["failed"]


# -- bad input ------------------------------------------------------------------------------


async def counts(api: InProcessApi) -> tuple[int, int]:
    async with state_of(api).db.read() as session:
        jobs = await session.scalar(select(func.count()).select_from(Job))
        batches = await session.scalar(select(func.count()).select_from(Batch))
    return int(jobs or 0), int(batches or 0)


BAD_WEBHOOKS = [
    ({"webhook": "http://example.com/hook"}, "webhook", "https"),
    ({"webhook": "ftp://example.com/hook"}, "webhook", "https"),
    ({"webhook": "https://10.0.0.7/hook"}, "webhook", "private"),
    ({"webhook": "https://169.254.169.254/latest/meta-data"}, "webhook", "metadata"),
    ({"webhook": "https://[::1]:8443/hook"}, "webhook", "loopback"),
    ({"webhook": "https://192.168.1.1/hook"}, "webhook", "private"),
    ({"webhook": "not a url"}, "webhook", "URL"),
    ({"webhook": "https://"}, "webhook", "URL"),
    ({"webhook": "https://no-such-host.invalid/hook"}, "webhook", "resolved"),
    ({"webhook": "https://x.example/" + "a" * 2100}, "webhook", "2048"),
]


@pytest.mark.parametrize(("fields", "param", "says"), BAD_WEBHOOKS)
async def test_bad_webhook_urls_are_refused_and_nothing_is_stored(
    api: InProcessApi, fields: dict[str, Any], param: str, says: str
) -> None:
    before = await counts(api)
    async with api.client() as client:
        response = await client.post("/v1/jobs", json=job_body(**fields))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and says in error["message"], error
        file_id = await upload_batch_file(client, jsonl([chat_line("a")]))
        response = await client.post(
            "/v1/batches",
            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", **fields},
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    assert await counts(api) == before


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"webhook_events_filter": ["start", "output"]}, "webhook_events_filter.1"),
        ({"webhook_events_filter": []}, "webhook_events_filter"),
        ({"webhook_events_filter": "start"}, "webhook_events_filter"),
    ],
)
async def test_bad_event_filters_are_refused(
    api: InProcessApi, receiver: Receiver, fields: dict[str, Any], param: str
) -> None:
    before = await counts(api)
    async with api.client() as client:
        response = await client.post(
            "/v1/jobs", json=job_body(webhook=receiver.url("/f"), **fields)
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        # A filter without a URL says so.
        response = await client.post("/v1/jobs", json=job_body(webhook_events_filter=["completed"]))
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "webhook_events_filter"
        # A batch's events are its own: `start` is a job's.
        file_id = await upload_batch_file(client, jsonl([chat_line("a")]))
        response = await client.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "webhook": receiver.url("/f"),
                "webhook_events_filter": ["start"],
            },
        )
        assert response.status_code == 400
    assert await counts(api) == before


async def test_loopback_needs_the_setting() -> None:
    """Without FERRY_WEBHOOK_ALLOW_NETWORKS, loopback is refused like any private address;
    with it, plain http is accepted only there."""
    with pytest.raises(urls.RefusedUrl, match="loopback"):
        await urls.vet("http://127.0.0.1:9/hook", ())
    with pytest.raises(urls.RefusedUrl, match="loopback"):
        await urls.vet("https://localhost:9/hook", ())
    allowed = urls.allowed_networks(ApiSettings(webhook_allow_networks="127.0.0.0/8"))
    assert (await urls.vet("http://127.0.0.1:9/hook", allowed)).host == "127.0.0.1"
    # An allowed private network still needs https.
    private = urls.allowed_networks(ApiSettings(webhook_allow_networks="10.0.0.0/8"))
    assert (await urls.vet("https://10.1.2.3/hook", private)).host == "10.1.2.3"
    with pytest.raises(urls.RefusedUrl, match="https"):
        await urls.vet("http://10.1.2.3/hook", private)


def test_signature_matches_the_specification() -> None:
    """The header is `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` with the
    secret's base64-decoded bytes: computed here by hand, beside the package's."""
    import base64
    import hmac
    from datetime import UTC, datetime

    secret = api_keys.new_webhook_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    assert len(key) == 32
    body = json.dumps({"id": "job_1"}).encode()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    expected = hmac.new(key, b"msg_1." + str(int(at.timestamp())).encode() + b"." + body, "sha256")
    signed = Webhook(secret).sign("msg_1", at, body)
    assert signed == "v1," + base64.b64encode(expected.digest()).decode()


# -- the repository, on both backends ---------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
async def sessions(
    request: pytest.FixtureRequest, tmp_path: Path, hooks_database: str
) -> AsyncIterator[Sessions]:
    """conftest's `sessions`, but on this module's database: the session stack's API
    processes (which deliver from the session database) must not claim these messages."""
    from storage.migrate import upgrade

    url = hooks_database
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ferry.db'}"
        await asyncio.to_thread(upgrade, url)
    engine = create_db_engine(StorageSettings(database_url=url))
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def test_messages_are_recorded_with_the_state_change_once_each(sessions: Sessions) -> None:
    """A start per job (not per claim: a job taken over after its lease lapsed has started
    already), a completion per end (a cancel's, not again when the worker's partial output
    lands), none for a rolled-back change; claims hold a message until the lease lapses."""
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
    hooked = [
        Job(
            id=jobs_repo.new_job_id(),
            owner_id=key.id,
            model="m",
            kind="chat",
            lane="interactive",
            status=JobStatus.QUEUED,
            priority=0,
            request={"messages": [], "max_tokens": 4},
            attempts=0,
            webhook_url="https://10.9.9.9/x",
            webhook_events=events,
        )
        for events in (None, None, ["completed"])
    ]
    done, cancelled, filtered = hooked
    async with sessions.begin() as session:
        await jobs_repo.insert_jobs(session, hooked)
    async with sessions.begin() as session:
        claimed = await jobs_repo.claim_jobs(session, [j.id for j in hooked], "w1", 0.2)
    assert len(claimed) == 3
    # A claim that rolls back leaves no message.
    with contextlib.suppress(RuntimeError):
        async with sessions.begin() as session:
            await asyncio.sleep(0.3)
            assert await jobs_repo.claim_job(session, done.id, "w2", 30) is not None
            raise RuntimeError("rolled back")
    async with sessions.begin() as session:
        retaken = await jobs_repo.claim_job(session, done.id, "w2", 30)
        assert retaken is not None and retaken.attempts == 2
        assert await jobs_repo.cancel_job(session, cancelled.id) == JobStatus.RUNNING
    ok = jobs_repo.JobOutcome(JobStatus.SUCCEEDED, ["a"], "stop", 1, 1, None)
    partial = jobs_repo.JobOutcome(JobStatus.CANCELLED, ["x"], "abort", 1, 1, None)
    failed = jobs_repo.JobOutcome(JobStatus.FAILED, [], None, 1, 0, None, error="boom")
    async with sessions.begin() as session:
        assert await jobs_repo.finish_jobs(session, "w2", [(done.id, ok)]) == [True]
        assert await jobs_repo.finish_jobs(
            session, "w1", [(cancelled.id, partial), (filtered.id, failed)]
        ) == [True, True]
    async with sessions() as session:
        events = {
            j.id: [r.event for r in await webhooks_repo.list_for_object(session, j.id)]
            for j in hooked
        }
    assert events == {
        done.id: ["start", "completed"],
        cancelled.id: ["start", "completed"],
        filtered.id: ["completed"],
    }
    # Claims: each due message once, until its lease lapses.
    async with sessions.begin() as session:
        first = await webhooks_repo.claim_due(session, limit=100, lease_seconds=0.3)
    mine = {r.id for r in first if r.object_id in events}
    assert len(mine) == 5
    async with sessions.begin() as session:
        again = await webhooks_repo.claim_due(session, limit=100, lease_seconds=30)
    assert not mine & {r.id for r in again}
    await asyncio.sleep(0.4)
    async with sessions.begin() as session:
        lapsed = await webhooks_repo.claim_due(session, limit=100, lease_seconds=30)
        target = next(r for r in lapsed if r.id in mine)
        await webhooks_repo.record_attempt(
            session, target.id, status=200, error=None, delivered=True, next_attempt_at=None
        )
    assert mine <= {r.id for r in lapsed}
    async with sessions() as session:
        row = await webhooks_repo.get(session, target.id)
    assert row is not None and row.delivered_at is not None and row.attempts == 1


# -- with a real worker (last: its stack empties this module's Redis db) ------------------


@pytest.mark.timeout(300)
def test_a_real_worker_sends_start_and_completed(
    own_database: str, model_cache: Path, logs: Path, s3_url: str, receiver: Receiver
) -> None:
    """The worker's claim and its end, through Celery and the engine, each announced."""
    with open_stack(own_database, 6, model_cache, s3_url) as stack:
        stack.add_api(
            "hooks-api",
            logs,
            FERRY_WEBHOOK_ALLOW_NETWORKS="127.0.0.1/32",
            FERRY_WEBHOOK_POLL_SECONDS="0.2",
        )
        stack.add_worker("hooks-worker", TINY, "transformers", logs)
        with stack.client() as client:
            response = client.post("/v1/jobs", json=job_body(webhook=receiver.url("/e2e")))
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            # And a batch run to its end: `completed`.
            upload = client.post(
                "/v1/files",
                files={"file": ("in.jsonl", jsonl([chat_line("a")]), "application/jsonl")},
                data={"purpose": "batch"},
            )
            assert upload.status_code == 200, upload.text
            response = client.post(
                "/v1/batches",
                json={
                    "input_file_id": upload.json()["id"],
                    "endpoint": "/v1/chat/completions",
                    "webhook": receiver.url("/e2e-batch"),
                },
            )
            assert response.status_code == 200, response.text
            batch_id = response.json()["id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (
                len(receiver.at("/e2e")) < 2 or not receiver.at("/e2e-batch")
            ):
                time.sleep(0.1)
            shown = client.get(f"/v1/jobs/{job_id}").json()
            batch_shown = client.get(f"/v1/batches/{batch_id}").json()
        plain = own_database.replace("postgresql+asyncpg://", "postgresql://")
        with psycopg.connect(plain) as conn:
            row = conn.execute(
                "SELECT webhook_secret FROM api_keys WHERE key_hash = %s",
                (api_keys.hash_key(KEY_A),),
            ).fetchone()
    assert row is not None
    # Two messages, in no promised order (each is sent on its own).
    by_event = {m.headers["ferry-webhook-event"]: m for m in receiver.at("/e2e")}
    assert sorted(by_event) == ["completed", "start"]
    assert verified(row[0], by_event["start"])["id"] == job_id
    body = verified(row[0], by_event["completed"])
    assert body == shown and body["status"] == "succeeded" and body["result"]["text"]
    [batch_message] = receiver.at("/e2e-batch")
    assert batch_message.headers["ferry-webhook-event"] == "completed"
    batch_body = verified(row[0], batch_message)
    assert batch_body == batch_shown and batch_body["status"] == "completed"
    assert batch_body["request_counts"]["completed"] == 1
