"""Batch input files: bad input is refused and nothing is stored, upload limits come from
settings, and a file's lifecycle.

API-level: the app runs in process (tests/fixtures/api.py), no worker."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from api.core.settings import ApiSettings
from tests.batching import CHAT, chat_line, jsonl
from tests.conftest import KEY_A, KEY_B
from tests.fixtures.api import InProcessApi, running_api
from tests.helpers import assert_error

pytestmark = pytest.mark.timeout(120)


async def test_bad_input_is_refused_and_nothing_is_stored(in_process_api: InProcessApi) -> None:
    valid = jsonl([chat_line("a")])
    async with in_process_api.client() as http:
        files_before = (await http.get("/v1/files", params={"limit": 10_000})).json()["data"]
        batches_before = (await http.get("/v1/batches", params={"limit": 100})).json()["data"]

        async def post_file(data: bytes, purpose: str = "batch") -> httpx.Response:
            return await http.post(
                "/v1/files",
                data={"purpose": purpose},
                files={"file": ("in.jsonl", data, "application/jsonl")},
            )

        assert_error(await post_file(valid, purpose="fine-tune"), 400, "invalid_purpose")
        assert_error(await post_file(b"name,age\nbob,3\n"), 400, "invalid_file_format")
        assert_error(await post_file(b""), 400, "empty_file")
        assert_error(await post_file(b"\n  \n"), 400, "empty_file")
        assert_error(await post_file(b"{}\n" * 50_001), 400, "too_many_lines")
        assert_error(await http.post("/v1/files", data={"purpose": "batch"}), 400)
        files_after = (await http.get("/v1/files", params={"limit": 10_000})).json()["data"]
        assert files_after == files_before

        good = (await post_file(valid)).json()["id"]
        completions_file = await post_file(jsonl([{**chat_line("a"), "url": "/v1/completions"}]))

        async def create(**body: Any) -> httpx.Response:
            return await http.post(
                "/v1/batches",
                json={"input_file_id": good, "endpoint": CHAT, "completion_window": "24h", **body},
            )

        assert_error(await create(input_file_id="file-nope"), 404, "not_found")
        async with in_process_api.client(KEY_B) as other:
            error = assert_error(
                await other.post(
                    "/v1/batches",
                    json={"input_file_id": good, "endpoint": CHAT, "completion_window": "24h"},
                ),
                404,
            )
            assert error["param"] == "input_file_id"
            assert_error(await other.get(f"/v1/files/{good}/content"), 404)
        assert_error(await create(endpoint="/v1/embeddings"), 400, "unsupported_endpoint")
        assert_error(
            await create(input_file_id=completions_file.json()["id"]), 400, "endpoint_mismatch"
        )
        assert_error(await create(completion_window="soon"), 400, "invalid_completion_window")
        assert_error(await create(completion_window="400d"), 400, "invalid_completion_window")
        assert_error(await create(metadata={str(i): "v" for i in range(17)}), 400)
        batches_after = (await http.get("/v1/batches", params={"limit": 100})).json()["data"]
        assert batches_after == batches_before
        assert_error(await http.get("/v1/batches/batch_nope"), 404)
        assert_error(await http.post("/v1/batches/batch_nope/cancel"), 404)


async def test_upload_limits_come_from_settings(in_process_api: InProcessApi) -> None:
    # A second app on the same database and Redis, with its own limits.
    settings = ApiSettings(api_keys=[KEY_A, KEY_B], batch_max_file_bytes=2000, batch_max_lines=5)
    async with (
        running_api(
            in_process_api.database_url,
            in_process_api.redis_url,
            in_process_api.object_dir,
            settings,
        ) as limited,
        limited.client() as http,
    ):

        async def post_file(data: bytes) -> httpx.Response:
            return await http.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", data, "application/jsonl")},
            )

        line = json.dumps(chat_line("a")).encode() + b"\n"
        assert (await post_file(line * 5)).status_code == 200
        assert_error(await post_file(line * 6), 400, "too_many_lines")
        big = json.dumps(chat_line("a", content="x" * 3000)).encode() + b"\n"
        assert_error(await post_file(big), 413, "file_too_large")
        # Over the multipart body bound too: refused before it is read whole.
        assert_error(await post_file(b"x" * (2 * 1024 * 1024)), 413)


async def test_file_lifecycle(in_process_api: InProcessApi) -> None:
    data = jsonl([chat_line("a"), chat_line("b")])
    async with in_process_api.sdk(KEY_A) as client:
        file_id = (
            await client.files.create(
                file=("mine.jsonl", data, "application/jsonl"), purpose="batch"
            )
        ).id
        info = await client.files.retrieve(file_id)
        assert (info.filename, info.bytes, info.purpose) == ("mine.jsonl", len(data), "batch")
        assert (await client.files.content(file_id)).content == data
        deleted = await client.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    async with in_process_api.client() as http:
        assert_error(await http.get(f"/v1/files/{file_id}"), 404)
        assert_error(await http.get(f"/v1/files/{file_id}/content"), 404)
        assert_error(await http.delete(f"/v1/files/{file_id}"), 404)
