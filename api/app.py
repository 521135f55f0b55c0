"""`create_app`: the FastAPI application and the lifespan that owns its clients."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import ASGIApp, Receive, Scope, Send

from api.admin import routes as admin
from api.admin import webhooks as webhook_secret
from api.batches import files
from api.batches import routes as batches
from api.batches.supervisor import BatchSupervisor
from api.conversations import routes as conversations
from api.core.auth import KeyRing
from api.core.db import Database
from api.core.errors import PayloadTooLarge, error_response, install_error_handlers
from api.core.nul import RefuseNul
from api.core.openapi import install_openapi
from api.core.settings import ApiSettings, get_api_settings
from api.core.state import AppState
from api.eas import routes as eas
from api.images import routes as images
from api.jobs import routes as jobs
from api.jobs.dispatch import Dispatcher
from api.jobs.enqueue import JobQueue, create_producer
from api.jobs.expiry import ExpirySweep
from api.jobs.intake import JobIntake
from api.jobs.reconciler import Reconciler
from api.models import routes as models
from api.models.catalog import ModelCatalog
from api.openai import chat, completions
from api.ops import routes as ops
from api.ops.http_metrics import HttpMetrics, HttpMetricsMiddleware
from api.ops.retention import RetentionPolicy, RetentionSweeper
from api.streaming.event_hub import JobEventHub
from api.ui import docs
from api.ui.routes import mount_page
from api.ui.security import DOCS_CSP, PAGE_CSP, SecurityHeaders
from api.webhooks.deliverer import WebhookDeliverer
from storage import telemetry
from storage.channels import CancelChannel
from storage.db import create_db_engine, create_session_factory
from storage.events import JobEventStream
from storage.migrate import upgrade_async
from storage.objects import ObjectStoreSettings, build_object_store
from storage.registry import ModelRegistry
from storage.repositories import api_keys
from storage.settings import StorageSettings, get_storage_settings
from storage.telemetry import TraceRequests

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up, then shutdown in reverse: each client's cleanup is registered as soon as
    it exists, so a start-up that fails halfway still closes what it had opened."""
    settings: ApiSettings = app.state.settings
    storage: StorageSettings = app.state.storage
    async with AsyncExitStack() as stack:
        # Last out: buffered spans are written before uvicorn ends the process by signal.
        stack.callback(telemetry.flush)
        if settings.migrate_on_start:
            await upgrade_async(storage.database_url)
        engine = create_db_engine(storage)
        stack.push_async_callback(engine.dispose)
        sessions = create_session_factory(engine)
        db = Database(sessions)
        open_owner = None
        async with db.transaction() as session:
            await api_keys.ensure_keys(session, settings.api_keys)
            if settings.auth == "off":
                open_owner = await api_keys.ensure_builtin_owner(session)
            else:
                # FERRY_API_KEYS is the list in force: a key dropped from it stops working.
                # (With authentication off no key is in force, so none is revoked.)
                revoked = await api_keys.revoke_unlisted(session, settings.api_keys)
                if revoked:
                    log.warning("revoked %d keys no longer in FERRY_API_KEYS", revoked)
        if open_owner is not None:
            log.warning(
                "Authentication is OFF (FERRY_AUTH=off): every request, whatever its "
                "Authorization header, runs as the built-in owner `%s`. Anyone who "
                "can reach this API can use it.",
                open_owner,
            )
        redis = Redis.from_url(storage.redis_url, max_connections=256)
        stack.push_async_callback(redis.aclose)
        registry = ModelRegistry(redis)
        queue = JobQueue(create_producer(storage.redis_url), storage.redis_url)
        # Safe before start(): it then only closes the queue's Redis client.
        stack.push_async_callback(queue.stop)
        dispatcher = Dispatcher(
            db,
            registry,
            queue,
            redis,
            defaults=settings.default_limits(),
            window_factor=settings.dispatch_window_factor,
            interval_seconds=settings.dispatch_interval_seconds,
        )
        app.state.dispatcher = dispatcher
        intake = JobIntake(db, queue, on_held=dispatcher.wake, metrics=redis)
        objects = await asyncio.to_thread(build_object_store, app.state.object_store)
        queue.start()
        intake.start()
        stack.push_async_callback(intake.stop)
        dispatcher.start()
        stack.push_async_callback(dispatcher.stop)
        # The hub's own client, on RESP2: under RESP3 (redis-py's default) every pub/sub
        # message is a push notification, which redis-py's hiredis parser formats for a
        # debug log, and the hub reads one per token per stream (bench/README.md).
        hub_redis = Redis.from_url(storage.redis_url, protocol=2)
        stack.push_async_callback(hub_redis.aclose)
        hub = JobEventHub(hub_redis)
        stack.push_async_callback(hub.stop)  # also after a start() that failed halfway
        await hub.start()
        state = AppState(
            settings=settings,
            storage=storage,
            db=db,
            redis=redis,
            events=JobEventStream(
                redis,
                maxlen=storage.event_stream_maxlen,
                ttl_seconds=storage.event_stream_ttl_seconds,
            ),
            hub=hub,
            registry=registry,
            queue=queue,
            intake=intake,
            keys=KeyRing(
                db,
                open_owner,
                defaults=settings.default_limits(),
                admin_key=settings.admin_key,
                cache_seconds=settings.key_cache_seconds,
            ),
            catalog=ModelCatalog(
                registry,
                default_model=settings.default_model,
                aliases=settings.model_aliases,
                declared=settings.models,
                grace_seconds=settings.model_grace_seconds,
            ),
            objects=objects,
            cancels=CancelChannel(redis),
        )
        app.state.ferry = state
        reconciler = Reconciler(
            db,
            redis,
            queue,
            interval_seconds=settings.reconcile_interval_seconds,
            grace_seconds=settings.reconcile_grace_seconds,
            metrics_resync_seconds=settings.metrics_resync_seconds,
        )
        reconciler.start()
        stack.push_async_callback(reconciler.stop)
        expiry = ExpirySweep(state)
        expiry.start()
        stack.push_async_callback(expiry.stop)
        batch_supervisor = BatchSupervisor(state)
        app.state.batch_supervisor = batch_supervisor
        batch_supervisor.start()
        stack.push_async_callback(batch_supervisor.stop)
        webhook_deliverer = WebhookDeliverer(db, settings)
        app.state.webhook_deliverer = webhook_deliverer
        webhook_deliverer.start()
        stack.push_async_callback(webhook_deliverer.stop)
        retention = RetentionSweeper(
            db,
            redis,
            objects,
            RetentionPolicy.from_settings(settings),
            interval_seconds=settings.retention_interval_seconds,
        )
        app.state.retention = retention
        retention.start()
        stack.push_async_callback(retention.stop)
        # What start-up imported and built lives as long as the process: out of the garbage
        # collector's sight, a full collection no longer walks it (a pause every request
        # in flight would wait out).
        gc.freeze()
        yield


class BodySizeLimit:
    """Refuse bodies over the limit with 413, by header or while streaming in.

    `path_limits` gives routes under a path prefix their own limit (batch file uploads)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = next(
            (
                limit
                for prefix, limit in self.path_limits.items()
                if scope["path"].startswith(prefix)
            ),
            self.max_bytes,
        )
        too_large = PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> dict[str, object]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise too_large
            return dict(message)

        await self.app(scope, limited_receive, send)


def create_app(
    settings: ApiSettings | None = None,
    storage: StorageSettings | None = None,
    object_store: ObjectStoreSettings | None = None,
) -> FastAPI:
    """The API; each settings object not given is read from the environment."""
    settings = settings or get_api_settings()
    app = FastAPI(
        title="Ferry",
        summary="Asynchronous inference for chat and multimodal LLMs",
        description=(
            "Submit jobs and poll them, stream their tokens over Server-Sent Events, or use "
            "the OpenAI-compatible chat completions API; every request is a job on a queue "
            "served by GPU workers that batch continuously."
        ),
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's pages load Swagger UI and ReDoc from a CDN: api.ui.docs serves its own.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.storage = storage or get_storage_settings()
    app.state.object_store = object_store
    install_error_handlers(app)
    install_openapi(app)
    for module in (
        jobs,
        chat,
        completions,
        images,
        models,
        ops,
        conversations,
        eas,
        files,
        batches,
        admin,
        webhook_secret,
        docs,
    ):
        app.include_router(module.router)
    mount_page(app)
    # A batch file may be far larger than a request: the route checks its own limit, this
    # one only bounds the multipart body around it.
    upload_limit = settings.batch_max_file_bytes + 1024 * 1024
    # A span per request when tracing is on (storage/telemetry.py); one check when off.
    app.add_middleware(TraceRequests)
    app.add_middleware(RefuseNul)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, path_limits={"/v1/files": upload_limit}
    )
    # Outermost, so that even an answer another middleware gives on these paths has them.
    app.add_middleware(
        SecurityHeaders,
        policies={"/docs": DOCS_CSP, "/redoc": DOCS_CSP, "/ui/docs": DOCS_CSP, "/ui": PAGE_CSP},
    )
    # Outermost of all: every answer is counted, whichever layer gave it.
    app.state.http_metrics = HttpMetrics()
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.http_metrics, routes=app.routes)
    return app
