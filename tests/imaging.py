"""Test support for image intake: images built in memory, and loopback HTTP servers that
record every request they get (so a test can prove a server was never reached)."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from tests.conftest import Stack


def image_bytes(
    fmt: str = "PNG",
    size: tuple[int, int] = (16, 12),
    color: tuple[int, int, int] = (200, 30, 30),
    **save: Any,
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def oriented_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    """A JPEG whose left half is red and right half blue, with an EXIF Orientation tag."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def animated_gif(frames: int = 3, size: tuple[int, int] = (8, 8)) -> bytes:
    images = [Image.new("RGB", size, (60 * i, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=50)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG a few hundred bytes long that claims width x height 1-bit
    pixels: decoding it would need width*height/8 bytes (1.25 GB by default)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    content_length: bool = True


@dataclass(frozen=True)
class Hit:
    path: str
    host: str


class RecordingServer:
    """A threaded HTTP server on a loopback address; `hits` lists every request."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Route] = {}
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.hits.append(Hit(self.path, self.headers.get("Host", "")))
                route = owner.routes.get(self.path.split("?")[0], Route(status=404))
                if route.delay:
                    time.sleep(route.delay)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(route.body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self._server = Server((host, 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/image.png") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def serve(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        return self.serve(path, Route(status=status, headers={"Location": location}))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# Small limits, so over-limit cases are quick to build and send.
IMAGE_LIMITS_ENV = {
    "FERRY_IMAGE_MAX_PER_REQUEST": "3",
    "FERRY_IMAGE_MAX_BYTES": str(256 * 1024),
    "FERRY_IMAGE_MAX_PIXELS": str(1_000_000),
    "FERRY_IMAGE_MAX_REQUEST_BYTES": str(512 * 1024),
    "FERRY_IMAGE_FETCH_TIMEOUT_SECONDS": "2",
    "FERRY_IMAGE_FETCH_MAX_REDIRECTS": "2",
}
ANNOUNCED_VISION = "ferry-images-announced"


@dataclass
class ImageStack:
    """API processes for image-intake tests, on their own Redis database and bucket.

    `safe_url` runs the default fetch policy; `lenient_url` may also fetch from
    127.0.0.1 (FERRY_IMAGE_FETCH_ALLOW_NETWORKS), for URL images served by a test server.
    `model` is announced in the registry as taking images, with no worker behind it: what
    these tests check is the API's intake, and its jobs simply stay queued.
    """

    stack: Stack
    safe_url: str
    lenient_url: str
    model: str = ANNOUNCED_VISION

    @property
    def bucket(self) -> str:
        return self.stack.env["FERRY_S3_BUCKET"]

    def s3(self) -> Any:
        import boto3

        env = self.stack.env
        return boto3.client(
            "s3",
            endpoint_url=env["FERRY_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=env["FERRY_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=env["FERRY_S3_SECRET_ACCESS_KEY"],
        )

    def object_keys(self) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def start_image_stack(stack: Stack, logs: Path) -> ImageStack:
    from ferry_testing.procs import start_api
    from storage.keys import MODELS_HASH
    from storage.registry import ServedModel, now_epoch

    stack.env.update(IMAGE_LIMITS_ENV)
    safe = stack.add_api("api-images-safe", logs)
    lenient_env = {**stack.env, "FERRY_IMAGE_FETCH_ALLOW_NETWORKS": "127.0.0.1/32"}
    proc, lenient = start_api("api-images-lenient", lenient_env, logs)
    stack.procs.append(proc)
    announced = ServedModel(
        ANNOUNCED_VISION,
        max_model_len=2048,
        engine="vllm",
        supports_images=True,
        created=now_epoch(),
    )
    stack.redis().hset(MODELS_HASH, announced.name, announced.to_json())
    return ImageStack(stack, safe, lenient)
