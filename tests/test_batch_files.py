"""Batch input files on the session stack: bad input is refused and nothing is stored,
upload limits come from settings, and a file's lifecycle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.batching import CHAT, chat_line, jsonl, sdk, upload
from tests.conftest import KEY_A, KEY_B, Stack
from tests.helpers import assert_error

pytestmark = pytest.mark.timeout(900)


def test_bad_input_is_refused_and_nothing_is_stored(stack: Stack) -> None:
    valid = jsonl([chat_line("a")])
    with stack.client() as http:
        files_before = http.get("/v1/files", params={"limit": 10_000}).json()["data"]
        batches_before = http.get("/v1/batches", params={"limit": 100}).json()["data"]

        def post_file(data: bytes, purpose: str = "batch") -> httpx.Response:
            return http.post("/v1/files", data={"purpose": purpose},
                             files={"file": ("in.jsonl", data, "application/jsonl")})

        assert_error(post_file(valid, purpose="fine-tune"), 400, "invalid_purpose")
        assert_error(post_file(b"name,age\nbob,3\n"), 400, "invalid_file_format")
        assert_error(post_file(b""), 400, "empty_file")
        assert_error(post_file(b"\n  \n"), 400, "empty_file")
        assert_error(post_file(b"{}\n" * 50_001), 400, "too_many_lines")
        assert_error(http.post("/v1/files", data={"purpose": "batch"}), 400)
        assert http.get("/v1/files", params={"limit": 10_000}).json()["data"] == files_before

        good = post_file(valid).json()["id"]
        completions_file = post_file(jsonl([{**chat_line("a"), "url": "/v1/completions"}]))

        def create(**body: Any) -> httpx.Response:
            return http.post("/v1/batches", json={"input_file_id": good, "endpoint": CHAT,
                                                  "completion_window": "24h", **body})

        assert_error(create(input_file_id="file-nope"), 404, "not_found")
        with stack.client(KEY_B) as other:
            error = assert_error(other.post("/v1/batches", json={
                "input_file_id": good, "endpoint": CHAT, "completion_window": "24h"}), 404)
            assert error["param"] == "input_file_id"
            assert_error(other.get(f"/v1/files/{good}/content"), 404)
        assert_error(create(endpoint="/v1/embeddings"), 400, "unsupported_endpoint")
        assert_error(create(input_file_id=completions_file.json()["id"]), 400,
                     "endpoint_mismatch")
        assert_error(create(completion_window="soon"), 400, "invalid_completion_window")
        assert_error(create(completion_window="400d"), 400, "invalid_completion_window")
        assert_error(create(metadata={str(i): "v" for i in range(17)}), 400)
        assert http.get("/v1/batches", params={"limit": 100}).json()["data"] == batches_before
        assert_error(http.get("/v1/batches/batch_nope"), 404)
        assert_error(http.post("/v1/batches/batch_nope/cancel"), 404)


def test_upload_limits_come_from_settings(stack: Stack, logs: Path) -> None:
    from ferry_testing.procs import start_api

    proc, url = start_api("batch-limits-api", {
        **stack.env, "FERRY_BATCH_MAX_FILE_BYTES": "2000", "FERRY_BATCH_MAX_LINES": "5",
    }, logs)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            def post_file(data: bytes) -> httpx.Response:
                return http.post("/v1/files", data={"purpose": "batch"},
                                 files={"file": ("in.jsonl", data, "application/jsonl")})

            line = json.dumps(chat_line("a")).encode() + b"\n"
            assert post_file(line * 5).status_code == 200
            assert_error(post_file(line * 6), 400, "too_many_lines")
            big = json.dumps(chat_line("a", content="x" * 3000)).encode() + b"\n"
            assert_error(post_file(big), 413, "file_too_large")
            # Over the multipart body bound too: refused before it is read whole.
            assert_error(post_file(b"x" * (2 * 1024 * 1024)), 413)
    finally:
        proc.stop()


def test_file_lifecycle(stack: Stack) -> None:
    client = sdk(stack)
    data = jsonl([chat_line("a"), chat_line("b")])
    file_id = upload(client, data, "mine.jsonl")
    info = client.files.retrieve(file_id)
    assert (info.filename, info.bytes, info.purpose) == ("mine.jsonl", len(data), "batch")
    assert client.files.content(file_id).content == data
    deleted = client.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with stack.client() as http:
        assert_error(http.get(f"/v1/files/{file_id}"), 404)
        assert_error(http.get(f"/v1/files/{file_id}/content"), 404)
        assert_error(http.delete(f"/v1/files/{file_id}"), 404)
