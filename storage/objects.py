"""Object storage: images and batch files live here; SQL rows keep only their keys.

Two backends behind one interface:
- `S3ObjectStore` — any S3-compatible endpoint (AWS, MinIO, moto's server) through boto3;
  the bucket is created if it is missing.
- `LocalObjectStore` — a directory (the embedded default, `ferry serve`).

The methods are synchronous (boto3 is); async callers wrap them in `asyncio.to_thread`.
Keys are `/`-separated relative paths; `image_key` and `file_key` name what Ferry stores.
Uploads stream: `put_stream` reads its source in chunks (S3 multipart through boto3's
transfer manager), so a 200 MB batch file is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, cast

from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK = 1024 * 1024


class ObjectStoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # "local" (a directory; the embedded default) or "s3" (any S3-compatible endpoint).
    object_store: Literal["local", "s3"] = "local"
    object_dir: Path = Path.home() / ".local" / "share" / "ferry" / "objects"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "ferry"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    # Lifetime of presigned GET URLs handed to clients.
    s3_presign_seconds: int = 3600


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    content_type: str


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def put_stream(self, key: str, source: IO[bytes], content_type: str) -> StoredObject:
        """Store a file-like object read in chunks."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream an object's bytes (raises ObjectNotFound before the first chunk)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove an object; a missing key is not an error."""

    def presigned_url(self, key: str) -> str | None:
        """A time-limited GET URL clients can use directly, or None (serve via the API)."""
        ...


def image_key(sha256_hex: str) -> str:
    """Images are content-addressed: the same bytes are stored once."""
    return f"images/{sha256_hex[:2]}/{sha256_hex}"


def file_key(file_id: str) -> str:
    """Uploaded and generated files (batch input/output/error JSONL)."""
    return f"files/{file_id}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalObjectStore:
    """Objects as files under one directory; writes go to a temp file, then rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        import io

        return self.put_stream(key, io.BytesIO(data), content_type)

    def put_stream(self, key: str, source: IO[bytes], content_type: str) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, size, content_type)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            handle = self._path(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        return _read_chunks(handle, chunk_size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def presigned_url(self, key: str) -> str | None:
        return None

    def clear(self) -> None:
        """Tests only: remove everything."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)


def _read_chunks(handle: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


class S3ObjectStore:
    """An S3 bucket through boto3 (thread-safe client; one per process)."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = settings.s3_bucket
        self.presign_seconds = settings.s3_presign_seconds
        self.client: S3Client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32),
        )
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as create_exc:
                code = create_exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        return StoredObject(key, len(data), content_type)

    def put_stream(self, key: str, source: IO[bytes], content_type: str) -> StoredObject:
        counter = _CountingReader(source)
        self.client.upload_fileobj(
            cast(IO[bytes], counter), self.bucket, key, ExtraArgs={"ContentType": content_type}
        )
        return StoredObject(key, counter.count, content_type)

    def _get(self, key: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from None
            raise

    def get_bytes(self, key: str) -> bytes:
        body = self._get(key)["Body"]
        with body:
            data: bytes = body.read()
        return data

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        body = self._get(key)["Body"]

        def chunks() -> Iterator[bytes]:
            with body:
                yield from body.iter_chunks(chunk_size)

        return chunks()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def presigned_url(self, key: str) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.presign_seconds,
        )
        return url


class _CountingReader:
    """Wraps a readable to count the bytes boto3 pulls through it."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        return data


def build_object_store(settings: ObjectStoreSettings | None = None) -> ObjectStore:
    settings = settings or ObjectStoreSettings()
    if settings.object_store == "s3":
        return S3ObjectStore(settings)
    return LocalObjectStore(settings.object_dir)


@lru_cache(maxsize=1)
def get_object_store() -> ObjectStore:
    """The process's one store, built from FERRY_ settings."""
    return build_object_store()
