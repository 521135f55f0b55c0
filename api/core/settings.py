"""API settings, read once from the environment (FERRY_ prefix)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.core.limits import KeyLimits


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # Bearer tokens accepted at start, comma-separated; stored hashed.
    api_keys: Annotated[list[str], NoDecode] = []
    host: str = "127.0.0.1"
    port: int = 8000
    # Run Alembic migrations when the API starts.
    migrate_on_start: bool = True
    # max_tokens when a request gives none. Unset: the rest of the model's context (as
    # vLLM and OpenAI); set, a cap for such requests (not for those that name one).
    default_max_tokens: int | None = Field(None, ge=1)
    # Request bodies larger than this are refused with 413 before they are read whole.
    max_request_bytes: int = 16 * 1024 * 1024
    # Reconciler: how often it looks, and how long a job may sit before it is re-sent.
    reconcile_interval_seconds: float = 10.0
    reconcile_grace_seconds: float = 30.0
    # How often /metrics' open-job counts are corrected from SQL (one count per model of the
    # jobs not ended; one process in all).
    metrics_resync_seconds: float = Field(300.0, gt=0)
    # SSE: keep-alive comment interval and the longest a connection is held open.
    sse_keepalive_seconds: float = 15.0
    sse_max_seconds: float = 3600.0
    # How long a non-streaming chat completion waits for its job.
    sync_timeout_seconds: float = 600.0
    # Liveness (docs/operations.md): models listed and accepted although no worker serves
    # them (scale from zero), comma-separated; how long a model whose last worker is gone
    # stays listed; how long a synchronous request waits for a worker before a 503; a
    # model's held backlog beyond which new interactive work gets a 503 (0: no limit).
    models: Annotated[list[str], NoDecode] = []
    model_grace_seconds: float = Field(60.0, ge=0)
    sync_wait_seconds: float = Field(30.0, ge=0)
    max_queued_per_model: int = Field(10_000, ge=0)
    # Authentication: "on" (API keys, the default) or "off": every request, whatever its
    # Authorization header, runs as one built-in owner (a warning is logged at start).
    auth: Literal["on", "off"] = "on"
    # The model a request without `model` (or with an alias) goes to. Unset: the only
    # served model; with several served, such a request is a 400 listing them.
    default_model: str | None = None
    # Model names that mean "the default model", comma-separated (FastDeploy's client
    # sends model="null").
    model_aliases: Annotated[list[str], NoDecode] = ["null", "default"]
    # The served model the PAI-EAS routes (/infer_forward, POST /, WebSocket /) use, as
    # their requests name none. Unset: FERRY_DEFAULT_MODEL, else the first served model by
    # name. A request with an image goes to a model that takes images if this one does not.
    eas_model: str | None = None
    # Images (api/images), per request: how many, bytes per image (decoded or downloaded),
    # pixels per image (width x height), and bytes of all the request's images together.
    image_max_per_request: int = Field(8, ge=0)
    image_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    image_max_pixels: int = Field(25_000_000, ge=1)
    image_max_request_bytes: int = Field(32 * 1024 * 1024, ge=1)
    # Fetching image URLs: the whole fetch (all redirect hops) must end within the timeout.
    image_fetch_timeout_seconds: float = Field(10.0, gt=0)
    image_fetch_max_redirects: int = Field(3, ge=0)
    # CIDRs the fetcher may reach although they are private or loopback (an internal image
    # server), comma-separated; empty by default. Cloud metadata addresses stay refused.
    image_fetch_allow_networks: Annotated[list[str], NoDecode] = []
    # Webhooks (api/webhooks): URLs must be https and public. These CIDRs are reachable
    # although private or loopback, and loopback ones over plain http too (a receiver on
    # the same host; tests); empty by default. Cloud metadata addresses stay refused.
    webhook_allow_networks: Annotated[list[str], NoDecode] = []
    # A failed delivery is retried after base x 2^(attempt-1) seconds (at most max, with
    # jitter), until max_age after the event; then it is given up.
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    webhook_retry_max_seconds: float = Field(3600.0, gt=0)
    webhook_max_age_seconds: float = Field(24 * 3600.0, gt=0)
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    # Deliveries in flight per API process, and how often it looks for due ones.
    webhook_concurrency: int = Field(64, ge=1)
    webhook_poll_seconds: float = Field(1.0, gt=0)
    # Batches (api/batches): input file limits, the longest completion window accepted.
    batch_max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    batch_max_lines: int = Field(50_000, ge=1)
    batch_max_completion_window_seconds: int = Field(7 * 24 * 3600, ge=1)
    # Batch lines go out a window at a time (each worker announces its own, see
    # api/batches/feeder.py); the narrower one while the model has interactive jobs, or
    # had within this many seconds.
    batch_interactive_cooldown_seconds: float = Field(5.0, ge=0)
    # The feeder's pass interval (workers also wake it whenever a batch line ends).
    batch_feed_interval_seconds: float = Field(1.0, gt=0)
    # Interactive jobs are released to the workers fairly across keys (api/jobs/dispatch.py):
    # per model, up to its live workers' engine slots times this factor (the rest a backlog
    # that keeps the engines full); a pass at least this often (also on submit and job end).
    dispatch_window_factor: float = Field(4.0, ge=1.0, le=100.0)
    dispatch_interval_seconds: float = Field(1.0, gt=0)
    # An API process expanding a batch holds it (renewed as it goes) this long; if it dies,
    # another takes the batch over once the lease has lapsed.
    batch_expand_lease_seconds: float = Field(60.0, gt=0)

    # Idempotency-Key (api/core/idempotency.py): how long an answer is replayed; how long
    # a first request holds its key while it creates its object (a replica that dies
    # mid-way frees it after this); how long a retry waits for that first answer (then 409).
    idempotency_ttl_seconds: float = Field(24 * 3600, gt=0)
    idempotency_lease_seconds: float = Field(60.0, gt=0)
    idempotency_wait_seconds: float = Field(10.0, ge=0)

    # Retention (api/ops/retention.py): rows older than these ages are deleted; 0 keeps
    # them for good. The sweep runs this often, deleting at most `batch_size` rows per
    # statement and pausing between statements.
    retention_interval_seconds: float = Field(600.0, gt=0)
    retention_batch_size: int = Field(1000, ge=1, le=100_000)
    retention_pause_seconds: float = Field(0.05, ge=0, le=60)
    retain_jobs_seconds: float = Field(30 * 86400, ge=0)
    retain_conversations_seconds: float = Field(90 * 86400, ge=0)
    retain_files_seconds: float = Field(30 * 86400, ge=0)
    retain_batches_seconds: float = Field(30 * 86400, ge=0)
    retain_images_seconds: float = Field(30 * 86400, ge=0)
    retain_webhook_deliveries_seconds: float = Field(7 * 86400, ge=0)

    # The admin key: the only one that reaches /v1/admin/* (keys, limits, secrets).
    # Unset: no admin API (every /v1/admin route is a 404).
    admin_key: str | None = None
    # Each key's limits where the key sets none (api/core/limits.py); unset: no limit.
    default_requests_per_minute: int | None = Field(None, ge=1)
    default_tokens_per_minute: int | None = Field(None, ge=1)
    default_batch_lines_per_day: int | None = Field(None, ge=1)
    default_max_concurrent_jobs: int | None = Field(None, ge=1)
    default_max_queued_jobs: int | None = Field(None, ge=0)
    default_max_priority: int | None = Field(None, ge=0, le=9)
    default_weight: int = Field(1, ge=1)
    # tokens_per_minute counts a request's max completion: this many tokens when the
    # request names no max_tokens and FERRY_DEFAULT_MAX_TOKENS is unset (the real use is
    # settled when the job ends).
    tpm_default_completion_tokens: int = Field(1024, ge=1, le=10_000_000)
    # How long a key looked up stays trusted in one process: a revoked key is refused by
    # every replica within this time.
    key_cache_seconds: float = Field(2.0, ge=0, le=5)
    # Deadlines (docs/api.md): a job still queued this long after it was made ends
    # `expired` and never runs, unless its request (`deadline_seconds`, `Cancel-After`)
    # asks for another. Batch lines (lane `bulk`) have none of their own unless a line
    # asks: their batch's completion window ends them.
    deadline_interactive_seconds: float = Field(3600.0, gt=0)
    # The longest deadline a request may ask for.
    max_deadline_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    # How often the expiry sweep ends queued jobs past their deadline (one process at a
    # time), and how many it ends per statement.
    deadline_sweep_seconds: float = Field(1.0, gt=0)
    deadline_sweep_batch: int = Field(500, ge=1)

    @field_validator(
        "api_keys",
        "image_fetch_allow_networks",
        "webhook_allow_networks",
        "model_aliases",
        "models",
        mode="before",
    )
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("image_fetch_allow_networks", "webhook_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad one
        return value

    @model_validator(mode="after")
    def _deadlines_within_max(self) -> ApiSettings:
        if self.deadline_interactive_seconds > self.max_deadline_seconds:
            raise ValueError(
                f"FERRY_DEADLINE_INTERACTIVE_SECONDS ({self.deadline_interactive_seconds}) "
                f"is above FERRY_MAX_DEADLINE_SECONDS ({self.max_deadline_seconds})"
            )
        return self

    def default_limits(self) -> KeyLimits:
        return KeyLimits(
            requests_per_minute=self.default_requests_per_minute,
            tokens_per_minute=self.default_tokens_per_minute,
            batch_lines_per_day=self.default_batch_lines_per_day,
            max_concurrent_jobs=self.default_max_concurrent_jobs,
            max_queued_jobs=self.default_max_queued_jobs,
            max_priority=self.default_max_priority,
            weight=self.default_weight,
        )


@lru_cache(maxsize=1)
def get_api_settings() -> ApiSettings:
    return ApiSettings()
