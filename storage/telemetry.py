"""OpenTelemetry traces of a job, across the API and its worker (optional: the `otel` extra).

Off unless `FERRY_TRACING` (otlp, console, off) or the standard `OTEL_*` variables turn it
on. Off, nothing here imports OpenTelemetry and every hook is one check of `_tracer`, so
the token path makes no span objects. On, the API stores the W3C `traceparent` of the
request's span on the job (`jobs.traceparent`), and the worker's spans (queue wait, the
attempt, prefill, decode, publication) are its children: one trace per request, whichever
processes take part.

The worker's prefill and decode spans, and the publication span, are made after the fact
from times it keeps anyway, so they cost nothing per token.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar

from pydantic_settings import BaseSettings, SettingsConfigDict

from storage import logs

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from storage.events import JobEvent
    from storage.models import Job

_P = ParamSpec("_P")
_R = TypeVar("_R")

TracingMode = Literal["otlp", "console", "off"]


class TelemetrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # Where spans go: otlp (OTEL_EXPORTER_OTLP_* say where), console (stdout), off. Unset:
    # the standard OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT decide (else off).
    tracing: TracingMode | None = None
    # `json`: one JSON object a log line, with the job id and trace id of a job's lines.
    log_format: logs.LogFormat = "text"


# None: tracing is off (the one check every hook makes).
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def enabled() -> bool:
    return _tracer is not None


def tracing_mode(settings: TelemetrySettings) -> TracingMode:
    """FERRY_TRACING, else what the standard OpenTelemetry variables ask for."""
    if settings.tracing is not None:
        return settings.tracing
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off"
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if exporter:
        if exporter == "none":
            return "off"
        if exporter in ("otlp", "console"):
            return exporter  # type: ignore[return-value]
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={exporter!r}: Ferry exports to `otlp` or `console` (or `none`)"
        )
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return "otlp"
    return "off"


def configure_tracing(service_name: str, settings: TelemetrySettings | None = None) -> bool:
    """Start exporting this process's spans if the environment asks for it; whether it
    does. Raises ValueError naming the setting when it cannot (a bad value, or the `otel`
    extra not installed)."""
    mode = tracing_mode(settings or TelemetrySettings())
    if mode == "off":
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError as exc:
        raise ValueError(
            f"FERRY_TRACING={mode} needs OpenTelemetry: pip install 'ferry[otel]' ({exc})"
        ) from None
    exporter: SpanExporter
    if mode == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ValueError(
                f"FERRY_TRACING=otlp needs the OTLP exporter: pip install 'ferry[otel]' ({exc})"
            ) from None
        exporter = OTLPSpanExporter()  # endpoint, headers: OTEL_EXPORTER_OTLP_*
    # OTEL_SERVICE_NAME, when set, names the service instead.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    return True


def use_provider(provider: TracerProvider | None) -> None:
    """Spans go to this provider from now on (None: tracing off). Tests install one with
    an in-memory exporter."""
    global _tracer, _provider
    if _provider is not None and provider is not _provider:
        _provider.shutdown()
    _provider = provider
    _tracer = provider.get_tracer("ferry") if provider is not None else None
    _publications.clear()


def flush() -> None:
    """Write what is buffered (at a process's end: one ended by a signal runs no atexit)."""
    if _provider is not None:
        _provider.force_flush()


# -- trace context ------------------------------------------------------------------------


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id in a W3C traceparent (`00-<trace id>-<span id>-<flags>`)."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span (None: tracing off, or no span)."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def _context_of(traceparent: str) -> Context:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1e9)


def _in_trace() -> bool:
    from opentelemetry.trace import get_current_span

    return bool(get_current_span().get_span_context().is_valid)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child of the current span (nothing when tracing is off, or outside a trace: a
    step is never a trace of its own)."""
    if _tracer is None or not _in_trace():
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


@contextlib.contextmanager
def trace_root(name: str) -> Iterator[None]:
    """The current span, else (tracing on) a new trace's root span: work that no traced
    request carries (an EAS WebSocket turn) still gets a trace of its own."""
    if _tracer is None or _in_trace():
        yield
        return
    with _tracer.start_as_current_span(name):
        yield


def traced(name: str) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """An async function run inside a span of its own (when tracing is on)."""

    def wrap(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        @functools.wraps(fn)
        async def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if _tracer is None or not _in_trace():
                return await fn(*args, **kwargs)
            with _tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return run

    return wrap


# -- the API ------------------------------------------------------------------------------


class TraceRequests:
    """ASGI middleware: a server span per HTTP request (a `traceparent` header the client
    sends makes it a child of the client's trace). Health checks, metrics and static pages
    are left out: they concern no job."""

    _SKIP = ("/health", "/ready", "/metrics", "/ui", "/docs", "/redoc", "/openapi.json")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        tracer = _tracer
        if tracer is None or scope["type"] != "http" or scope["path"].startswith(self._SKIP):
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate")
        }
        parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        method = scope["method"]
        with tracer.start_as_current_span(
            method, context=parent, kind=SpanKind.SERVER, attributes={"http.method": method}
        ) as request_span:

            async def sending(message: Any) -> None:
                if message["type"] == "http.response.start":
                    request_span.set_attribute("http.status_code", message["status"])
                await send(message)

            try:
                await self.app(scope, receive, sending)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", None) or scope["path"]
                request_span.update_name(f"{method} {path}")
                request_span.set_attribute("http.route", path)


async def traced_batches(
    batches: AsyncIterator[list[JobEvent] | None], job_id: str, traceparent: str
) -> AsyncIterator[list[JobEvent] | None]:
    """A job's event batches as delivered to one subscriber, in a `ferry.sse` span of the
    job's trace (linked to the request that reads them), with the job named in its log
    lines."""
    assert _tracer is not None
    from opentelemetry.trace import Link, get_current_span

    here = get_current_span().get_span_context()
    links = [Link(here)] if here.is_valid else None
    delivery = _tracer.start_span(
        "ferry.sse",
        context=_context_of(traceparent),
        links=links,
        attributes={"ferry.job_id": job_id},
    )
    events = 0
    try:
        async for batch in batches:
            if batch:
                events += len(batch)
            yield batch
    finally:
        delivery.set_attribute("ferry.events", events)
        delivery.end()


# -- the worker ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Publication:
    """A job's events as the publisher writes them, made into one span at its end."""

    parent: Context
    first_ns: int = 0
    last_ns: int = 0
    events: int = 0
    writes: int = 0


# Jobs whose events are being published, by id. Bounded: an attempt whose end never
# reaches the publisher (its job was taken over) must not be kept for ever.
_publications: OrderedDict[str, _Publication] = OrderedDict()
_MAX_PUBLICATIONS = 10_000


@contextlib.contextmanager
def job_attempt(job: Job) -> Iterator[None]:
    """Around a worker's attempt at a job: its log lines name the job and its trace; with
    tracing on, the queue wait (commit to claim) and the attempt are spans of the job's
    trace."""
    bound = logs.bind_job(job.id, trace_id_of(job.traceparent))
    try:
        if _tracer is None or not job.traceparent:
            yield
            return
        from opentelemetry.trace import set_span_in_context, use_span

        parent = _context_of(job.traceparent)
        if job.created_at is not None and job.started_at is not None:
            wait = _tracer.start_span(
                "ferry.queue_wait", context=parent, start_time=_ns(job.created_at)
            )
            wait.end(end_time=max(_ns(job.started_at), _ns(job.created_at)))
        attempt = _tracer.start_span(
            "ferry.attempt",
            context=parent,
            attributes={
                "ferry.job_id": job.id,
                "ferry.attempt": job.attempts,
                "ferry.model": job.model,
            },
        )
        _publications[job.id] = _Publication(set_span_in_context(attempt))
        while len(_publications) > _MAX_PUBLICATIONS:
            _publications.popitem(last=False)
        try:
            with use_span(attempt, end_on_exit=True):
                yield
        except BaseException:
            # Released, not ended: no terminal event will close its publication.
            publication = _publications.pop(job.id, None)
            if publication is not None and publication.writes:
                _publication_span(job.id, publication)
            raise
    finally:
        logs.unbind_job(bound)


class _Generation(Protocol):
    """What the prefill and decode spans read of a JobAttempt."""

    prompt_tokens: int | None
    completion_tokens: int
    first_token_at: datetime | None


@contextlib.contextmanager
def engine_spans(state: _Generation) -> Iterator[None]:
    """Around the engine's generation of an attempt (`state`: its JobAttempt): prefill (to
    the first token) and decode (the rest) spans, made when it ends."""
    if _tracer is None or not _in_trace():
        yield  # off, or a job without a trace
        return
    start = time.time_ns()
    try:
        yield
    finally:
        end = time.time_ns()
        first = _ns(state.first_token_at) if state.first_token_at is not None else None
        prefill = _tracer.start_span(
            "ferry.engine.prefill",
            start_time=start,
            attributes={"gen_ai.usage.input_tokens": state.prompt_tokens or 0},
        )
        prefill.end(end_time=min(first, end) if first is not None else end)
        if first is not None:
            decode = _tracer.start_span(
                "ferry.engine.decode",
                start_time=min(first, end),
                attributes={"gen_ai.usage.output_tokens": state.completion_tokens},
            )
            decode.end(end_time=end)


def published(batch: Sequence[tuple[str, JobEvent]], start_ns: int) -> None:
    """The publisher wrote this batch (started at `start_ns`): count it towards each traced
    job's publication, which becomes a span once its terminal event is written."""
    end_ns = time.time_ns()
    seen: set[str] = set()
    for job_id, event in batch:
        publication = _publications.get(job_id)
        if publication is None:
            continue
        if not publication.first_ns:
            publication.first_ns = start_ns
        publication.last_ns = end_ns
        publication.events += 1
        if job_id not in seen:
            seen.add(job_id)
            publication.writes += 1
        if event.type.is_terminal:
            del _publications[job_id]
            _publication_span(job_id, publication)


def _publication_span(job_id: str, publication: _Publication) -> None:
    assert _tracer is not None
    write = _tracer.start_span(
        "ferry.publish",
        context=publication.parent,
        start_time=publication.first_ns,
        attributes={
            "ferry.job_id": job_id,
            "ferry.events": publication.events,
            "ferry.writes": publication.writes,
        },
    )
    write.end(end_time=publication.last_ns)
