"""OpenAI routes refuse what Ferry does not honour, naming the parameter, and store nothing:
`n`, `logprobs`, unknown and unsupported fields, completions' own fields, `response_format`.

API-level: the app runs in process (tests/fixtures/api.py), with the tiny chat model
announced in its registry and no worker."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import TINY
from tests.helpers import assert_error, chat_body

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/jobs", {"n": 2}, "n"),
        ("/v1/chat/completions", {"n": 17}, "n"),
        ("/v1/chat/completions", {"n": 2, "conversation_id": "conv_x"}, "n"),
    ],
)
async def test_n_refused(
    api_client: httpx.AsyncClient, path: str, extra: dict[str, Any], param: str
) -> None:
    response = await api_client.post(path, json=chat_body(TINY, max_tokens=2, **extra))
    error = assert_error(response, 400)
    assert error["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
async def test_logprobs_refused(
    api_client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    response = await api_client.post("/v1/chat/completions", json=chat_body(TINY, **extra))
    assert assert_error(response, 400)["param"] == param


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"no_such_field": 1}, "no_such_field", "unknown_parameter"),
        ({"use_beam_search": True}, "use_beam_search", "unsupported_parameter"),
        ({"stop_token_ids": [5]}, "stop_token_ids", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "unsupported_parameter"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "unsupported_parameter",
        ),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", None),
    ],
)
async def test_fields_not_honoured_are_refused_by_name(
    api_client: httpx.AsyncClient, extra: dict[str, Any], param: str, code: str | None
) -> None:
    before = (await api_client.get("/v1/jobs", params={"limit": 1})).json()["data"]
    response = await api_client.post("/v1/chat/completions", json=chat_body(TINY, **extra))
    error = assert_error(response, 400, code)
    assert error["param"] == param and param in error["message"]
    assert (await api_client.get("/v1/jobs", params={"limit": 1})).json()["data"] == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["x"] * 17}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": ["x"] * 16, "n": 5}, "n"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
        ({"prompt": "x", "no_such_field": 1}, "no_such_field"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "model": "no-such-model"}, "model"),
    ],
)
async def test_completion_bad_input(
    api_client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    before = len((await api_client.get("/v1/jobs", params={"limit": 100})).json()["data"])
    response = await api_client.post("/v1/completions", json={"model": TINY, **body})
    assert response.status_code in (400, 404), response.text
    error = assert_error(response, response.status_code)
    assert (error["param"] or "").startswith(param), error
    after = len((await api_client.get("/v1/jobs", params={"limit": 100})).json()["data"])
    assert after == before  # nothing was created


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
        {"type": "yaml"},
        "json",
    ],
)
async def test_bad_response_format_is_400(api_client: httpx.AsyncClient, fmt: Any) -> None:
    response = await api_client.post(
        "/v1/chat/completions",
        json={
            "model": TINY,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": fmt,
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("response_format")
