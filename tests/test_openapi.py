"""`/openapi.json` tells the truth: schemathesis, every check, against a live Ferry (an API
process and a worker serving the tiny model), finds nothing.

Clients are generated from the document, so every status, content type and constraint a
route answers with must be in it. What a schema cannot state is listed in
`SCHEMATHESIS_CONFIG`, operation by operation, with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from tests.conftest import TINY, Stack, open_stack

# Requests a schema can describe but whose acceptance depends on more than their shape
# (positive_data_acceptance expects them answered 2xx or 404/409):
SCHEMATHESIS_CONFIG = """
# What the served model takes: its chat template's roles, images, its context length,
# prompts x n (at most 64 choices); the engine refuses the rest (400).
[[operations]]
include-path-regex = "^/(v1/(chat/completions|completions|jobs)|infer_forward)?$"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

# A batch's completion window is bounded by the server's setting, and its input file must
# be a `batch` file of this key's.
[[operations]]
include-path = "/v1/batches"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

# An upload is checked as JSONL (not empty, one JSON object per line): bytes a schema
# calls `format: binary`.
[[operations]]
include-path = "/v1/files"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

# Bodies are read in pydantic's lax mode, as OpenAI's and vLLM's servers read them: 0 and 1
# for booleans, 2.0 for an integer. More than the document promises, never less.
[[operations]]
include-method = "POST"
checks.negative_data_rejection.enabled = false
"""


@pytest.fixture(scope="module")
def live(own_database: str, model_cache: Path, logs: Path, s3_url: str) -> Iterator[Stack]:
    """One API process and one vLLM worker on Redis database 9 (no other test
    uses it), with a database of the module's own."""
    with open_stack(own_database, 9, model_cache, s3_url) as s:
        s.add_api("api-openapi", logs)
        # A short context keeps answers to schemathesis' large max_tokens short.
        s.add_worker("worker-openapi", TINY, "vllm", logs, FERRY_MAX_MODEL_LEN="256")
        yield s


def test_document_states_the_error_answers() -> None:
    document = create_app().openapi()
    schemas = document["components"]["schemas"]
    assert "ErrorResponse" in schemas and "HTTPValidationError" not in schemas
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            # Validation errors are 400 here, never FastAPI's 422.
            assert "422" not in responses, (method, path)
            if operation.get("security"):
                assert responses["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }, (method, path)


async def test_405_allows_every_method_of_the_path() -> None:
    # Two routes share the path (GET lists, POST creates): Starlette's own 405 named one.
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as client:
        response = await client.request("PUT", "/v1/conversations")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert response.json()["error"]["message"] == "Method Not Allowed"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(live: Stack, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    key = live.env["FERRY_API_KEYS"].split(",")[0]
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(schemathesis),
            "--config-file",
            str(config),
            "run",
            # Every check is on by default; `--checks all` would override the exclusions.
            f"{live.url}/openapi.json",
            "--max-examples",
            "5",
            "--seed",
            "14",
            "--header",
            f"Authorization: Bearer {key}",
            # Answers are generated on 2 CPU cores: slow is not wrong here.
            "--max-response-time",
            "120",
            "--request-timeout",
            "120",
            "--generation-database",
            "none",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-4_000:]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "query",
    [
        "/v1/files?after=%00x",
        "/v1/files?purpose=%00",
        "/v1/jobs?batch_id=%00",
        "/v1/conversations?after=%00",
    ],
)
def test_nul_in_a_query_value_is_400_not_500(live: Stack, query: str) -> None:
    # Findings of schemathesis: PostgreSQL text cannot hold NUL, and the query failed.
    with live.client(live.env["FERRY_API_KEYS"].split(",")[0]) as client:
        response = client.get(query)
    assert response.status_code == 400, response.text


@pytest.mark.e2e
def test_nul_in_a_batch_input_file_id_is_400_not_500(live: Stack) -> None:
    with live.client(live.env["FERRY_API_KEYS"].split(",")[0]) as client:
        response = client.post(
            "/v1/batches", json={"input_file_id": "file-\x00", "endpoint": "/v1/chat/completions"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input_file_id"
