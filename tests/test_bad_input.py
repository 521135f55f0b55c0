"""Bad input gets a clear 4xx in OpenAI's envelope, and nothing is persisted.

API-level: the app runs in process (tests/fixtures/api.py), with the tiny chat model
announced in its registry and no worker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import TINY
from tests.fixtures.api import InProcessApi
from tests.helpers import assert_error, chat_body

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def job_count(in_process_api: InProcessApi) -> Iterator[Any]:
    url = in_process_api.database_url.replace("postgresql+asyncpg://", "postgresql://")

    def count() -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM jobs").fetchone()
            assert row is not None
            return int(row[0])

    yield count


BAD_BODIES: list[tuple[str, Any, int, str | None, str | None]] = [
    # (case, body, status, error code, param)
    ("empty messages", {"model": TINY, "messages": []}, 400, None, "messages"),
    ("messages not a list", {"model": TINY, "messages": "hi"}, 400, None, "messages"),
    # (No `model` is not bad input: it goes to the default model, tests/test_model_routing.py.)
    (
        "model not a string",
        {"model": 7, "messages": [{"role": "user", "content": "x"}]},
        400,
        None,
        "model",
    ),
    (
        "bad role",
        {"model": TINY, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        None,
        "messages.0.role",
    ),
    ("temperature wrong type", chat_body(TINY, temperature="hot"), 400, None, "temperature"),
    ("temperature < 0", chat_body(TINY, temperature=-0.5), 400, None, "temperature"),
    ("max_tokens 0", chat_body(TINY, max_tokens=0), 400, None, "max_tokens"),
    (
        "max_tokens negative",
        chat_body(TINY, max_completion_tokens=-3),
        400,
        None,
        "max_completion_tokens",
    ),
    (
        "max_tokens over context",
        chat_body(TINY, max_tokens=10**7),
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    ("top_p 0", chat_body(TINY, top_p=0), 400, None, "top_p"),
    ("n over its cap", chat_body(TINY, n=17), 400, None, "n"),
    ("unknown field", chat_body(TINY, no_such_field=1), 400, "unknown_parameter", "no_such_field"),
    ("ignore_eos not a bool", chat_body(TINY, ignore_eos="yes"), 400, None, "ignore_eos"),
    ("priority out of range", chat_body(TINY, priority=42), 400, None, "priority"),
    ("metadata not strings", chat_body(TINY, metadata={"a": 1}), 400, None, "metadata.a"),
    (
        "metadata too many keys",
        chat_body(TINY, metadata={str(i): "v" for i in range(17)}),
        400,
        None,
        None,
    ),
    ("stop not strings", chat_body(TINY, stop=[1, 2]), 400, None, "stop"),
    ("unknown model", chat_body("no-such-model"), 404, "model_not_found", "model"),
    (
        "image part",
        {
            "model": TINY,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ],
        },
        400,
        "unsupported_content",
        "messages",
    ),
]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("case", "body", "status", "code", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_request_bodies(
    api_client: httpx.AsyncClient,
    job_count: Any,
    route: str,
    case: str,
    body: Any,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    before = job_count()
    error = assert_error(await api_client.post(route, json=body), status, code)
    assert error["param"] == param, error
    assert job_count() == before


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/chat/completions"])
async def test_malformed_json(api_client: httpx.AsyncClient, job_count: Any, route: str) -> None:
    before = job_count()
    response = await api_client.post(
        route, content=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"}
    )
    assert "JSON" in assert_error(response, 400)["message"]
    assert job_count() == before


async def test_oversized_body_is_413(api_client: httpx.AsyncClient, job_count: Any) -> None:
    before = job_count()
    huge = chat_body(TINY, "x" * (17 * 1024 * 1024))
    assert_error(await api_client.post("/v1/jobs", json=huge), 413, "payload_too_large")
    assert job_count() == before


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic abc"}]
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/job_x"),
        ("POST", "/v1/jobs/job_x/cancel"),
        ("GET", "/v1/jobs/job_x/events"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ],
)
async def test_missing_or_wrong_key_is_401(
    in_process_api: InProcessApi,
    job_count: Any,
    headers: dict[str, str],
    method: str,
    path: str,
) -> None:
    before = job_count()
    async with in_process_api.client(key=None) as client:
        response = await client.request(method, path, json=chat_body(TINY), headers=headers)
    assert_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert job_count() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/job_doesnotexist"),
        ("POST", "/v1/jobs/job_doesnotexist/cancel"),
        ("GET", "/v1/jobs/job_doesnotexist/events"),
    ],
)
async def test_unknown_job_is_404(api_client: httpx.AsyncClient, method: str, path: str) -> None:
    assert_error(await api_client.request(method, path), 404, "not_found")


async def test_bad_last_event_id_is_400(api_client: httpx.AsyncClient) -> None:
    # A stored job (no worker runs it here): the header is refused before any event is read.
    submitted = await api_client.post("/v1/jobs", json=chat_body(TINY, max_tokens=2))
    assert submitted.status_code == 202, submitted.text
    response = await api_client.get(
        f"/v1/jobs/{submitted.json()['id']}/events", headers={"Last-Event-ID": "banana"}
    )
    assert assert_error(response, 400)["param"] == "Last-Event-ID"


async def test_body_that_is_not_a_json_object(
    api_client: httpx.AsyncClient, job_count: Any
) -> None:
    before = job_count()
    as_form = await api_client.post(
        "/v1/jobs",
        content=b"model=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    as_list = await api_client.post("/v1/jobs", json=[1, 2])
    assert "JSON object" in assert_error(as_form, 400)["message"]
    assert "JSON object" in assert_error(as_list, 400)["message"]
    assert job_count() == before


async def test_bad_list_parameters(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get("/v1/jobs?status=sleeping")
    assert assert_error(response, 400)["param"] == "status"
    assert assert_error(await api_client.get("/v1/jobs?limit=0"), 400)["param"] == "limit"


NUL_TEXT = "a\u0000b"
NUL_REQUESTS: list[tuple[str, str, Any, str | None]] = [
    # (method, path, JSON body, the param the error names): PostgreSQL can store no NUL,
    # so each is refused up front.
    ("POST", "/v1/chat/completions", chat_body(TINY, NUL_TEXT), "messages.0.content"),
    ("POST", "/v1/completions", {"model": TINY, "prompt": NUL_TEXT, "max_tokens": 2}, "prompt"),
    ("POST", "/v1/jobs", chat_body(TINY, NUL_TEXT), "messages.0.content"),
    ("POST", "/v1/jobs", chat_body(TINY, metadata={"k": NUL_TEXT}), "metadata.k"),
    ("POST", "/v1/conversations", {"title": NUL_TEXT}, "title"),
    ("POST", "/", {"prompt": NUL_TEXT}, "prompt"),
    ("POST", "/infer_forward", {"prompt": NUL_TEXT}, "prompt"),
    ("GET", "/v1/jobs/job%00x", None, None),
    ("GET", "/v1/conversations/conv%00x", None, None),
    ("GET", "/v1/files/file%00x", None, None),
    ("GET", "/v1/jobs?after=job%00x", None, "after"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), NUL_REQUESTS)
async def test_a_nul_anywhere_is_400_and_stores_nothing(
    api_client: httpx.AsyncClient,
    job_count: Any,
    method: str,
    path: str,
    body: Any,
    param: str | None,
) -> None:
    before = job_count()
    response = await api_client.request(method, path, json=body)
    error = assert_error(response, 400)
    assert "NUL" in error["message"] and error["param"] == param, error
    assert job_count() == before


async def test_a_nul_escape_split_between_body_chunks_is_found(
    api_client: httpx.AsyncClient, job_count: Any
) -> None:
    raw = json.dumps(chat_body(TINY, NUL_TEXT)).encode()
    cut = raw.index(b"\\u0000") + 3

    async def chunks() -> AsyncIterator[bytes]:
        yield raw[:cut]
        yield raw[cut:]

    before = job_count()
    response = await api_client.post(
        "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "NUL" in assert_error(response, 400)["message"]
    assert job_count() == before


async def test_a_backslash_before_u0000_is_only_text(
    api_client: httpx.AsyncClient, job_count: Any
) -> None:
    """`\\u0000` typed as text (a backslash, then u0000) is no NUL: the job is accepted."""
    before = job_count()
    response = await api_client.post("/v1/jobs", json=chat_body(TINY, "print('\\u0000')"))
    assert response.status_code == 202, response.text
    assert job_count() == before + 1


async def test_an_oversized_body_sent_in_chunks_is_413(
    api_client: httpx.AsyncClient, job_count: Any
) -> None:
    """No Content-Length to refuse it by: the limit holds while the body streams in."""
    piece = b"x" * (1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "' + TINY.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(17):
            yield piece
        yield b'"}]}'

    before = job_count()
    response = await api_client.post(
        "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")
    assert job_count() == before
