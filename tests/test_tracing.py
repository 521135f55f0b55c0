"""OpenTelemetry traces and JSON log lines of a job (storage/telemetry.py, storage/logs.py).

The real API app in process and a real worker runner in process (the transformers engine
on the tiny model, no Celery), over real PostgreSQL and Redis: both export to one
in-memory exporter of the SDK, so the API's spans and the worker's can be checked to form
one trace.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis import Redis

from api.core.settings import ApiSettings
from api.jobs import service as jobs_service
from api.openai.schemas import ChatCompletionRequest
from storage import telemetry
from storage.keys import MODELS_HASH
from storage.logs import JobContextFilter, JsonFormatter
from storage.models import Job
from storage.registry import ServedModel, now_epoch
from storage.repositories import api_keys
from storage.settings import StorageSettings
from tests.conftest import KEY_A, REDIS_BASE, TINY, new_database
from tests.fixtures.api import InProcessApi, running_api
from tests.helpers import chat_body
from tests.imaging import data_url, image_bytes
from worker.engines import build_engine
from worker.runner import JobRunner
from worker.settings import WorkerSettings

pytestmark = pytest.mark.engine

TRACING_REDIS_DB = 11  # no test stack or other module uses db 11

API_SPANS = {"POST /v1/jobs", "ferry.validate", "ferry.sql_commit", "ferry.sse"}
WORKER_SPANS = {
    "ferry.queue_wait",
    "ferry.attempt",
    "ferry.engine.prefill",
    "ferry.engine.decode",
    "ferry.publish",
}


@dataclass
class Site:
    api: InProcessApi
    worker: JobRunner


@pytest.fixture(scope="module")
def tracing_database() -> Iterator[str]:
    with new_database("ferry_test_tracing") as url:
        yield url


@pytest.fixture(scope="module")
async def site(
    tracing_database: str, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Site]:
    redis_url = f"{REDIS_BASE}/{TRACING_REDIS_DB}"
    with Redis.from_url(redis_url) as client:
        client.flushdb()
    worker = JobRunner(
        WorkerSettings(
            model=TINY,
            engine="transformers",
            model_cache_dir=model_cache,
            max_model_len=512,
            concurrency=4,
        ),
        StorageSettings(database_url=tracing_database, redis_url=redis_url),
        build_engine,
    )
    await asyncio.to_thread(worker.start)  # announces the model in the registry
    try:
        objects = tmp_path_factory.mktemp("tracing-objects")
        settings = ApiSettings(api_keys=[KEY_A])
        async with running_api(tracing_database, redis_url, objects, settings) as api:
            yield Site(api, worker)
    finally:
        await asyncio.to_thread(worker.stop)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, for the API and the worker of this process alike."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_provider(None)


async def run_job(site: Site, **extra: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Submit a job, run it on the worker, read its event stream; (the 202's job, the
    finished job, the stream's text)."""
    async with site.api.client() as client:
        accepted = await client.post("/v1/jobs", json=chat_body(TINY, "Hi", max_tokens=4, **extra))
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        outcome = await asyncio.to_thread(site.worker.run_jobs, [job_id])
        assert outcome == ["succeeded"]
        stream = await client.get(f"/v1/jobs/{job_id}/events")
        assert stream.status_code == 200
        assert "event: done" in stream.text
        finished = (await client.get(f"/v1/jobs/{job_id}")).json()
    return accepted.json(), finished, stream.text


def spans_of(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    """The trace's spans by name, once the worker's last one (the publication, closed by
    the publisher's write of the terminal event) has come."""
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        named = {s.name: s for s in found}
        if "ferry.publish" in named or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(named) == len(found), f"a span name came twice: {[s.name for s in found]}"
    return named


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_spans_api_and_worker(site: Site, spans: InMemorySpanExporter) -> None:
    accepted, finished, _ = await run_job(site)
    trace_id = accepted["trace_id"]
    assert trace_id is not None and len(trace_id) == 32
    assert finished["trace_id"] == trace_id  # also when read back from SQL
    named = spans_of(spans, int(trace_id, 16))
    assert set(named) >= API_SPANS | WORKER_SPANS, sorted(named)

    root = named["POST /v1/jobs"]
    assert root.parent is None
    assert root.kind == trace.SpanKind.SERVER
    root_id = root.context.span_id
    # The API's steps, and the worker's (joined through jobs.traceparent), hang off the
    # request; the engine's and the publication off the attempt.
    for name in ("ferry.validate", "ferry.sql_commit", "ferry.queue_wait", "ferry.attempt"):
        assert parent_of(named[name]) == root_id, name
    attempt_id = named["ferry.attempt"].context.span_id
    for name in ("ferry.engine.prefill", "ferry.engine.decode", "ferry.publish"):
        assert parent_of(named[name]) == attempt_id, name
    # The stream was read by a later request: delivery is in the job's trace, linked to it.
    sse = named["ferry.sse"]
    assert parent_of(sse) == root_id
    assert [link.context.span_id for link in sse.links] != []
    assert sse.attributes is not None and sse.attributes["ferry.events"] >= 2

    def start(name: str) -> int:
        value = named[name].start_time
        assert value is not None
        return value

    def end(name: str) -> int:
        value = named[name].end_time
        assert value is not None
        return value

    # In order: commit, queue wait (commit to claim), prefill, decode.
    assert end("ferry.sql_commit") <= end("POST /v1/jobs")
    assert start("ferry.queue_wait") <= end("ferry.sql_commit")
    assert end("ferry.queue_wait") <= start("ferry.attempt")
    assert end("ferry.engine.prefill") <= start("ferry.engine.decode")
    assert start("ferry.attempt") <= start("ferry.engine.prefill")
    assert end("ferry.engine.decode") <= end("ferry.attempt")
    decode = named["ferry.engine.decode"].attributes
    assert decode is not None and decode["gen_ai.usage.output_tokens"] == 4

    async with site.api.app.state.ferry.db.read() as session:
        row = await session.get(Job, accepted["id"])
        assert row is not None and row.traceparent is not None
    assert row.traceparent.split("-")[1] == trace_id


async def test_client_traceparent_is_the_jobs_trace(
    site: Site, spans: InMemorySpanExporter
) -> None:
    """A client that sends a W3C traceparent gets its job into its own trace."""
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"}
    async with site.api.client() as client:
        accepted = await client.post(
            "/v1/jobs", json=chat_body(TINY, "Hi", max_tokens=2), headers=headers
        )
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["trace_id"] == client_trace
    root = next(s for s in spans.get_finished_spans() if s.name == "POST /v1/jobs")
    assert parent_of(root) == 0x00F067AA0BA902B7
    await asyncio.to_thread(site.worker.run_jobs, [accepted.json()["id"]])


async def test_tracing_off_makes_no_spans(site: Site) -> None:
    """Off (the default): no trace id on the job, nothing stored, no span anywhere, not
    even through OpenTelemetry's global provider."""
    assert not telemetry.enabled()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    accepted, finished, text = await run_job(site)
    assert accepted["trace_id"] is None and finished["trace_id"] is None
    assert "event: done" in text
    async with site.api.app.state.ferry.db.read() as session:
        row = await session.get(Job, accepted["id"])
        assert row is not None and row.traceparent is None
    provider.force_flush()
    assert exporter.get_finished_spans() == ()


async def test_json_log_line_names_job_and_trace(site: Site, spans: InMemorySpanExporter) -> None:
    """The worker's line about a job, in JSON, carries the job id and its trace id."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(JobContextFilter())
    runner_log = logging.getLogger("worker.runner")
    runner_log.addHandler(handler)
    level = runner_log.level
    runner_log.setLevel(logging.DEBUG)
    try:
        accepted, _, _ = await run_job(site)
    finally:
        runner_log.removeHandler(handler)
        runner_log.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    about = [line for line in lines if line["job_id"] == accepted["id"]]
    assert about, lines
    assert all(line["trace_id"] == accepted["trace_id"] is not None for line in about)
    assert {"time", "level", "logger", "message"} <= set(about[0])
    assert about[0]["logger"] == "worker.runner"
    # Outside a job (a fresh context: in-process, the API's request ran in this task's),
    # the fields are there and null.
    runner_log.addHandler(handler)
    try:
        contextvars.Context().run(runner_log.warning, "not about a job")
    finally:
        runner_log.removeHandler(handler)
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["message"] == "not about a job"
    assert last["job_id"] is None and last["trace_id"] is None


def test_tracing_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad FERRY_TRACING or OTEL_TRACES_EXPORTER is an error naming it; the OTEL_*
    variables turn tracing on when FERRY_TRACING is unset."""
    from pydantic import ValidationError

    monkeypatch.setenv("FERRY_TRACING", "jaeger")
    with pytest.raises(ValidationError, match="tracing"):
        telemetry.TelemetrySettings()
    monkeypatch.delenv("FERRY_TRACING")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        telemetry.tracing_mode(telemetry.TelemetrySettings())
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.tracing_mode(telemetry.TelemetrySettings()) == "off"
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    assert telemetry.tracing_mode(telemetry.TelemetrySettings()) == "off"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert telemetry.tracing_mode(telemetry.TelemetrySettings()) == "otlp"
    monkeypatch.setenv("FERRY_TRACING", "off")
    assert telemetry.tracing_mode(telemetry.TelemetrySettings()) == "off"


async def test_image_intake_spans(site: Site, spans: InMemorySpanExporter) -> None:
    """A request with an image: its intake (decode, verify) and its store are spans of the
    request's validation."""
    vision = ServedModel(
        "ferry-tracing-vision", 2048, "vllm", supports_images=True, created=now_epoch()
    )
    with Redis.from_url(site.api.redis_url) as client:
        client.hset(MODELS_HASH, vision.name, vision.to_json())
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_url(image_bytes())}},
    ]
    async with site.api.client() as client:
        accepted = await client.post("/v1/jobs", json=chat_body(vision.name, content))  # type: ignore[arg-type]
    assert accepted.status_code == 202, accepted.text
    trace_id = int(accepted.json()["trace_id"], 16)
    named = {s.name: s for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    validate = named["ferry.validate"].context.span_id
    assert parent_of(named["ferry.image.intake"]) == validate
    assert parent_of(named["ferry.image.store"]) == validate


async def test_submit_outside_a_request_starts_a_trace(
    site: Site, spans: InMemorySpanExporter
) -> None:
    """Jobs submitted where no request span is current (an EAS WebSocket turn) get a
    trace of their own, rooted at `ferry.submit`."""
    state = site.api.app.state.ferry
    async with state.db.transaction() as session:
        [key] = await api_keys.ensure_keys(session, [KEY_A])
    body = ChatCompletionRequest.model_validate(chat_body(TINY, "Hi", max_tokens=2))
    job = await jobs_service.build_chat_job(state, key.id, body)
    # Outside a trace, a step (validation) is no trace of its own.
    assert spans.get_finished_spans() == ()
    await jobs_service.submit(state.intake, [job])
    trace_id = telemetry.trace_id_of(job.traceparent)
    assert trace_id is not None
    named = {
        s.name: s for s in spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16)
    }
    root = named["ferry.submit"]
    assert root.parent is None
    assert parent_of(named["ferry.sql_commit"]) == root.context.span_id
    await asyncio.to_thread(site.worker.run_jobs, [job.id])


_WITHOUT_OTEL = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"no module named {name}")
        return None

sys.meta_path.insert(0, Absent())
import cli.main, worker.runner
from api.app import create_app
from api.core.settings import ApiSettings
from storage import telemetry

create_app(ApiSettings(api_keys=["sk-test"]))
assert not telemetry.configure_tracing("ferry-api", telemetry.TelemetrySettings())
try:
    telemetry.configure_tracing("ferry-api", telemetry.TelemetrySettings(tracing="otlp"))
except ValueError as exc:
    print(exc)
"""


def test_runs_without_opentelemetry() -> None:
    """Without the `otel` extra Ferry imports and builds its app (tracing off); asking
    for tracing then is an error naming the setting and the extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FERRY_TRACING"))}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OTEL],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "FERRY_TRACING=otlp needs OpenTelemetry" in done.stdout
    assert "ferry[otel]" in done.stdout


@pytest.mark.parametrize(
    ("variable", "value"), [("FERRY_TRACING", "jaeger"), ("FERRY_LOG_FORMAT", "xml")]
)
@pytest.mark.parametrize("command", ["api", "worker"])
def test_bad_setting_stops_the_command(command: str, variable: str, value: str) -> None:
    env = {**os.environ, variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", command],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"ferry {command}: cannot start: {variable}:" in done.stderr
