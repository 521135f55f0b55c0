"""The object store on both backends: a real S3 endpoint (moto server) and a directory."""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.objects import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreSettings,
    S3ObjectStore,
    build_object_store,
    image_key,
    sha256_hex,
)
from tests.conftest import s3_env


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "s3":
        s3_url: str = request.getfixturevalue("s3_url")
        env = s3_env(s3_url, f"objects-{secrets.token_hex(4)}")
        settings = ObjectStoreSettings(
            **{k.removeprefix("FERRY_").lower(): v for k, v in env.items()}
        )
        built = build_object_store(settings)
        assert isinstance(built, S3ObjectStore)  # the bucket did not exist: it was created
        yield built
    else:
        yield LocalObjectStore(tmp_path / "objects")


def test_put_get_exists_delete(store: ObjectStore) -> None:
    data = b"\x89PNG fake bytes"
    key = image_key(sha256_hex(data))
    assert not store.exists(key)
    stored = store.put_bytes(key, data, "image/png")
    assert (stored.key, stored.size) == (key, len(data))
    assert store.exists(key)
    assert store.get_bytes(key) == data
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is not an error
    with pytest.raises(ObjectNotFound):
        store.get_bytes(key)
    with pytest.raises(ObjectNotFound):
        store.iter_chunks(key)


def test_put_stream_reads_in_chunks_and_streams_back(store: ObjectStore) -> None:
    # 9 MiB: larger than boto3's multipart threshold (8 MiB), so S3 takes a multipart upload.
    data = os.urandom(9 * 1024 * 1024)
    stored = store.put_stream("files/big", io.BytesIO(data), "application/jsonl")
    assert stored.size == len(data)
    chunks = list(store.iter_chunks("files/big", chunk_size=1024 * 1024))
    assert len(chunks) >= 9
    assert b"".join(chunks) == data


def test_presigned_url_only_from_s3(store: ObjectStore) -> None:
    store.put_bytes("images/x", b"abc", "image/png")
    url = store.presigned_url("images/x")
    if isinstance(store, S3ObjectStore):
        assert url is not None and url.startswith("http://127.0.0.1:")
        import httpx

        assert httpx.get(url).content == b"abc"
    else:
        assert url is None


def test_local_store_refuses_keys_that_escape(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("../outside", b"x", "text/plain")
    assert not (tmp_path / "outside").exists()
