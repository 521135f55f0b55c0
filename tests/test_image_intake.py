"""Image intake: decoding, Pillow verification, limits, content-addressed storage in S3
(moto server), chat message building, and the API end to end.

End-to-end acceptance runs against `image_stack`, whose model is announced as taking
images with no worker behind it (the jobs stay queued): what is checked is what the API
stores before it accepts a job.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, cast

import psycopg
import pytest
from PIL import Image

from api.core.errors import FerryError, InvalidRequest
from api.core.settings import ApiSettings
from api.images import ImageIntake, ImageLimits, ingest_image, ingest_parts
from api.images.addresses import parse_networks
from api.images.chat import chat_messages
from api.images.errors import (
    ImagesNotSupported,
    ImageTooLarge,
    ImageUrlRefused,
    InvalidImage,
    TooManyImages,
)
from api.images.fetch import FetchPolicy
from api.images.verify import verify_image
from api.openai.schemas import ChatCompletionRequest
from storage.content import image_refs
from storage.objects import (
    ObjectStore,
    ObjectStoreSettings,
    S3ObjectStore,
    StoredObject,
    build_object_store,
    image_key,
    sha256_hex,
)
from storage.registry import ServedModel
from tests.conftest import KEY_A, KEY_B, Stack, s3_env
from tests.helpers import assert_error, submit, wait_job
from tests.imaging import (
    ImageStack,
    RecordingServer,
    Route,
    animated_gif,
    b64,
    data_url,
    image_bytes,
    oriented_jpeg,
    png_bomb,
)

# End-to-end cases start Ferry processes (and, for some, vLLM) on a shared machine.
pytestmark = pytest.mark.timeout(900)

PNG = image_bytes("PNG", (16, 12))
LIMITS = ImageLimits(
    max_per_request=3, max_bytes=256 * 1024, max_pixels=1_000_000,
    max_request_bytes=512 * 1024,
    fetch=FetchPolicy(timeout_seconds=3, max_redirects=2, max_bytes=256 * 1024,
                      allowed_networks=parse_networks(["127.0.0.1/32"])),
)


class CountingStore:
    """A real S3 store that counts uploads (to prove an existing image is not re-sent)."""

    def __init__(self, inner: S3ObjectStore) -> None:
        self.inner = inner
        self.puts: list[str] = []

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self.puts.append(key)
        return self.inner.put_bytes(key, data, content_type)

    def put_stream(self, key: str, source: IO[bytes], content_type: str) -> StoredObject:
        raise AssertionError("images are uploaded with put_bytes")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def keys(self) -> list[str]:
        listed = self.inner.client.list_objects_v2(Bucket=self.inner.bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture
def store(s3_url: str) -> CountingStore:
    env = s3_env(s3_url, f"intake-{secrets.token_hex(4)}")
    settings = ObjectStoreSettings(**{k.removeprefix("FERRY_").lower(): v
                                      for k, v in env.items()})
    built = build_object_store(settings)
    assert isinstance(built, S3ObjectStore)
    return CountingStore(built)


def intake(store: CountingStore, limits: ImageLimits = LIMITS) -> ImageIntake:
    return ImageIntake(cast(ObjectStore, store), limits)


def fake_state(store: CountingStore) -> Any:
    """What intake reads from AppState: the object store and the API settings."""
    settings = ApiSettings(
        image_max_per_request=3, image_max_bytes=256 * 1024, image_max_pixels=1_000_000,
        image_fetch_allow_networks=["127.0.0.1/32"],
    )
    return SimpleNamespace(objects=store, settings=settings)


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    s = RecordingServer("127.0.0.1")
    yield s
    s.close()


# ---------------------------------------------------------------- decoding


async def test_data_url_and_base64_spellings_give_one_image(store: CountingStore) -> None:
    images = intake(store)
    encoded = b64(PNG)
    spellings = [
        data_url(PNG), data_url(PNG, "image/jpeg"),  # the declared type is not trusted
        encoded, encoded.rstrip("="),
        base64.urlsafe_b64encode(PNG).decode(),
    ]
    spaced = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    refs = [await images.add(s, param="p") for s in spellings[:2]]
    refs += [await intake(store).add(s, param="p") for s in [*spellings[2:], spaced]]
    assert {r["sha256"] for r in refs} == {sha256_hex(PNG)}
    assert refs[0] == {"sha256": sha256_hex(PNG), "mime": "image/png", "width": 16,
                       "height": 12}


@pytest.mark.parametrize(("source", "needle"), [
    ("data:image/png;base64", "Malformed data URL"),
    ("data:text/plain;base64,aGVsbG8=", "not an image/* type"),
    ("data:;base64,aGVsbG8=", "not an image/* type"),
    ("data:image/png,%89PNG", "only base64 data URLs"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64,", "empty"),
    ("not base64 at all!", "neither an http(s) URL"),
    ("", "empty"),
])
async def test_malformed_sources(store: CountingStore, source: str, needle: str) -> None:
    with pytest.raises(InvalidImage, match=re.escape(needle)) as caught:
        await intake(store).add(source, param="messages.0.content.1.image_url.url")
    assert caught.value.param == "messages.0.content.1.image_url.url"
    assert caught.value.status_code == 400


async def test_oversize_base64_refused_before_decoding(store: CountingStore) -> None:
    # Not even valid base64: refused for its length alone, before any decoding.
    huge = "!" * (4 * LIMITS.max_bytes // 3 + 8)
    with pytest.raises(ImageTooLarge, match="FERRY_IMAGE_MAX_BYTES"):
        await intake(store).add(huge, param="images.0")
    with pytest.raises(ImageTooLarge, match="FERRY_IMAGE_MAX_BYTES"):
        await intake(store).add(data_url(os.urandom(LIMITS.max_bytes + 1)), param="p")


async def test_local_paths_are_never_read(store: CountingStore, tmp_path: Path) -> None:
    real = tmp_path / "real.png"
    real.write_bytes(PNG)
    for source in (str(real), "rose.jpg", "./rose.jpg", f"file://{real}", "C:\\rose.jpg",
                   "~/rose.png"):
        with pytest.raises((InvalidImage, ImageUrlRefused)):
            await intake(store).add(source, param="p")
    assert store.keys() == []


# ---------------------------------------------------------------- Pillow


@pytest.mark.parametrize(("fmt", "mime", "save"), [
    ("PNG", "image/png", {}), ("JPEG", "image/jpeg", {"quality": 90}),
    ("WEBP", "image/webp", {}), ("GIF", "image/gif", {}), ("BMP", "image/bmp", {}),
])
def test_accepted_formats_are_stored_as_sent(fmt: str, mime: str, save: Any) -> None:
    data = image_bytes(fmt, (20, 10), **save)
    verified = verify_image(data, max_pixels=10_000, param="p")
    assert verified.data == data
    assert verified.ref == {"sha256": sha256_hex(data), "mime": mime, "width": 20,
                            "height": 10}


@pytest.mark.parametrize("data", [
    image_bytes("TIFF"), image_bytes("ICO"), image_bytes("PPM"), b"%PDF-1.4 not an image",
    b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"GIF89a", b"",
], ids=["tiff", "ico", "ppm", "pdf", "svg", "gif-header-only", "empty"])
def test_other_data_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        verify_image(data, max_pixels=10_000_000, param="p")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_truncated_images_are_refused(fmt: str) -> None:
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buffer = io.BytesIO()
    noisy.save(buffer, format=fmt)
    data = buffer.getvalue()
    with pytest.raises(InvalidImage, match=r"truncated or corrupt|not an image"):
        verify_image(data[: len(data) * 2 // 3], max_pixels=10_000_000, param="p")


def test_pixel_cap_is_checked_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match=r"1200x1000 = 1200000 pixels.*IMAGE_MAX_PIXELS"):
        verify_image(image_bytes("PNG", (1200, 1000)), max_pixels=1_000_000, param="p")
    bomb = png_bomb()  # a few hundred bytes claiming 10^10 pixels
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="FERRY_IMAGE_MAX_PIXELS"):
        verify_image(bomb, max_pixels=1_000_000, param="p")
    # Above Pillow's own bomb limit too, even with a cap that would allow it.
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        verify_image(bomb, max_pixels=10**12, param="p")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(("orientation", "size", "top_red"), [
    (6, (20, 40), True),   # "rotate 90 CW to display": the left (red) half ends on top
    (8, (20, 40), False),  # "rotate 90 CCW": the right (blue) half ends on top
    (3, (40, 20), None),   # upside down: red ends on the right
])
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], top_red: bool | None
) -> None:
    data = oriented_jpeg((40, 20), orientation)
    verified = verify_image(data, max_pixels=10_000, param="p")
    assert verified.data != data
    assert (verified.ref["mime"], verified.ref["width"], verified.ref["height"]) == (
        "image/png", *size)
    assert verified.ref["sha256"] == sha256_hex(verified.data)
    with Image.open(io.BytesIO(verified.data)) as stored:
        assert stored.format == "PNG" and stored.size == size
        assert 0x0112 not in stored.getexif()
        rgb = stored.convert("RGB")
        if top_red is None:
            red, blue = rgb.getpixel((35, 10)), rgb.getpixel((5, 10))
        else:
            first, second = rgb.getpixel((10, 5)), rgb.getpixel((10, 35))
            red, blue = (first, second) if top_red else (second, first)
        assert isinstance(red, tuple) and isinstance(blue, tuple)
        assert red[0] > 200 and red[2] < 60, red
        assert blue[2] > 200 and blue[0] < 60, blue


def test_upright_jpeg_is_kept_byte_for_byte() -> None:
    data = oriented_jpeg((40, 20), 1)
    assert verify_image(data, max_pixels=10_000, param="p").data == data


def test_animated_gif_keeps_its_first_frame() -> None:
    data = animated_gif(frames=3)
    verified = verify_image(data, max_pixels=10_000, param="p")
    assert verified.ref["mime"] == "image/png"
    with Image.open(io.BytesIO(verified.data)) as stored:
        assert getattr(stored, "n_frames", 1) == 1
        assert stored.convert("RGB").getpixel((0, 0)) == (0, 0, 0)  # frame 0's colour


# ---------------------------------------------------------------- storage and limits


async def test_same_image_is_stored_once(store: CountingStore) -> None:
    first = intake(store)
    ref_a = await first.add(data_url(PNG), param="p")
    ref_b = await first.add(b64(PNG), param="p")  # twice in one request
    await first.store()
    second = intake(store)
    ref_c = await second.add(data_url(PNG), param="p")  # and again in another request
    await second.store()
    assert ref_a == ref_b == ref_c
    key = image_key(ref_a["sha256"])
    assert store.keys() == [key]
    assert store.puts == [key]  # the second request found it and uploaded nothing
    assert store.inner.get_bytes(key) == PNG
    head = store.inner.client.head_object(Bucket=store.inner.bucket, Key=key)
    assert head["ContentType"] == "image/png"


async def test_nothing_is_stored_until_every_image_passed(store: CountingStore) -> None:
    images = intake(store)
    await images.add(data_url(PNG), param="images.0")
    with pytest.raises(InvalidImage):
        await images.add(data_url(b"not an image"), param="images.1")
    assert store.keys() == []


async def test_request_limits(store: CountingStore, server: RecordingServer) -> None:
    url = server.serve("/a.png", Route(body=PNG))
    images = intake(store)
    with pytest.raises(TooManyImages, match=r"4 images.*FERRY_IMAGE_MAX_PER_REQUEST"):
        images.expect(4, param="messages")
    for _ in range(3):
        await images.add(url, param="images")
    with pytest.raises(TooManyImages):
        await images.add(url, param="images")
    assert len(server.hits) == 3  # the fourth was refused before it was fetched
    big = image_bytes("BMP", (300, 200))  # 180 KB each: two pass, three exceed 512 KiB
    total = intake(store)
    await total.add(b64(big), param="a")
    await total.add(b64(big), param="b")
    with pytest.raises(ImageTooLarge, match="FERRY_IMAGE_MAX_REQUEST_BYTES"):
        await total.add(b64(big), param="c")


async def test_ingest_parts_splits_qwen_tags(store: CountingStore,
                                             server: RecordingServer) -> None:
    jpeg = image_bytes("JPEG", (8, 8))
    url = server.serve("/rose.jpg", Route(body=jpeg))
    text = f"Picture 1:<img>{url}</img>\nPicture 2:<img>{b64(PNG)}</img>\nCompare them."
    parts = await ingest_parts(fake_state(store), text, param="prompt")
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == [
        "Picture 1:", "\nPicture 2:", "\nCompare them."]
    refs = image_refs(parts)
    assert [r["sha256"] for r in refs] == [sha256_hex(jpeg), sha256_hex(PNG)]
    assert store.keys() == sorted(image_key(r["sha256"]) for r in refs)
    assert await ingest_parts(fake_state(store), "no tags", param="prompt") == [
        {"type": "text", "text": "no tags"}]
    with pytest.raises(InvalidImage):
        await ingest_parts(fake_state(store), "<img>rose.jpg</img>", param="prompt")


async def test_ingest_image_stores_at_once(store: CountingStore) -> None:
    ref = await ingest_image(fake_state(store), b64(PNG), param="image")
    assert store.keys() == [image_key(ref["sha256"])]


# ---------------------------------------------------------------- chat messages

VISION = ServedModel("vision", 2048, "vllm", supports_images=True)
TEXT = ServedModel("text", 2048, "vllm", supports_images=False)


def chat(messages: list[dict[str, Any]], **extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **extra})


async def test_chat_image_parts_and_tags(store: CountingStore) -> None:
    body = chat([
        {"role": "system", "content": "Be brief. <img>not an image, a system's text</img>"},
        {"role": "user", "content": [
            {"type": "text", "text": "First "},
            {"type": "image_url", "image_url": {"url": data_url(PNG)}},
            {"type": "text", "text": "then <img>" + b64(PNG) + "</img> again."}]},
        {"role": "assistant", "content": "Two red images."},
        {"role": "user", "content": "And now?"},
    ])
    messages = await chat_messages(intake(store), body, VISION)
    ref = {"sha256": sha256_hex(PNG), "mime": "image/png", "width": 16, "height": 12}
    assert messages == [
        {"role": "system", "content": "Be brief. <img>not an image, a system's text</img>"},
        {"role": "user", "content": [
            {"type": "text", "text": "First "}, {"type": "image", "image": ref},
            {"type": "text", "text": "then "}, {"type": "image", "image": ref},
            {"type": "text", "text": " again."}]},
        {"role": "assistant", "content": "Two red images."},
        {"role": "user", "content": "And now?"},
    ]


async def test_swift_images_fill_placeholders_in_order(store: CountingStore) -> None:
    gif = image_bytes("GIF", (4, 4))
    body = chat([{"role": "user", "content": "<image>cat, and <image>sheep?"}],
                images=[b64(PNG), b64(gif)])
    [message] = await chat_messages(intake(store), body, VISION)
    assert [p.get("text") or p["image"]["mime"] for p in message["content"]] == [
        "image/png", "cat, and ", "image/gif", "sheep?"]


async def test_swift_images_without_placeholders_go_before_the_last_user_text(
    store: CountingStore,
) -> None:
    body = chat([{"role": "user", "content": "Describe this image."},
                 {"role": "assistant", "content": "A kitten."},
                 {"role": "user", "content": "How many sheep?"}],
                images=[b64(PNG)])
    messages = await chat_messages(intake(store), body, VISION)
    assert messages[0]["content"] == "Describe this image."
    assert [p["type"] for p in messages[2]["content"]] == ["image", "text"]
    assert messages[2]["content"][1]["text"] == "How many sheep?"


@pytest.mark.parametrize(("body", "param", "needle"), [
    (chat([{"role": "user", "content": "<image> only one"}], images=[b64(PNG)] * 2),
     "images", "placeholders"),
    (chat([{"role": "system", "content": "x"}], images=[b64(PNG)]), "images", "user message"),
    (chat([{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]),
     "messages.0.content.0", "only accepted in user messages"),
    (chat([{"role": "user", "content": "<img>a</img><img>b</img>"}], images=["c", "d"]),
     "images", "4 images"),
])
async def test_chat_structure_refused_before_any_image_is_read(
    store: CountingStore, body: ChatCompletionRequest, param: str, needle: str,
) -> None:
    with pytest.raises(InvalidRequest, match=needle) as caught:
        await chat_messages(intake(store), body, VISION)
    assert caught.value.param == param


async def test_text_only_model(store: CountingStore) -> None:
    tagged = chat([{"role": "user", "content": "see <img>http://127.0.0.1/x.png</img>"}])
    assert await chat_messages(intake(store), tagged, TEXT) == [
        {"role": "user", "content": "see <img>http://127.0.0.1/x.png</img>"}]
    for body, param in [
        (chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]), "messages"),
        (chat([{"role": "user", "content": "x"}], images=[b64(PNG)]), "images"),
    ]:
        with pytest.raises(ImagesNotSupported, match="`text` does not take images") as caught:
            await chat_messages(intake(store), body, TEXT)
        assert caught.value.param == param


# ---------------------------------------------------------------- end to end


def job_rows(image_stack: ImageStack) -> int:
    url = image_stack.stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM jobs").fetchone()
        assert row is not None
        return int(row[0])


def stored_request(image_stack: ImageStack, job_id: str) -> Any:
    url = image_stack.stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT request FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert row is not None
        return row[0]


def test_image_job_stores_the_image_once_and_keeps_refs_only(image_stack: ImageStack) -> None:
    model, sha = image_stack.model, sha256_hex(PNG)
    encoded = b64(PNG)
    with image_stack.stack.client(KEY_A, url=image_stack.safe_url) as client:
        first = client.post("/v1/jobs", json={"model": model, "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]})
        assert first.status_code == 202, first.text
        second = client.post("/v1/jobs", json={"model": model, "images": [encoded],
                                                "messages": [{"role": "user",
                                                              "content": "And this?"}]})
        assert second.status_code == 202, second.text
    assert image_stack.object_keys().count(image_key(sha)) == 1
    ref = {"sha256": sha, "mime": "image/png", "width": 16, "height": 12}
    for job, text in ((first.json(), "What is this?"), (second.json(), "And this?")):
        request = stored_request(image_stack, job["id"])
        assert encoded[:40] not in json.dumps(request)  # no base64 anywhere in the row
        [message] = request["messages"]
        assert {"type": "image", "image": ref} in message["content"]
        assert {"type": "text", "text": text} in message["content"]


def test_url_image_job_fetched_by_the_api(image_stack: ImageStack) -> None:
    server = RecordingServer("127.0.0.1")
    jpeg = image_bytes("JPEG", (24, 24), (10, 200, 10))
    try:
        url = server.serve("/leaf.jpg", Route(body=jpeg, headers={"Content-Type": "image/jpeg"}))
        hop = server.redirect("/short", "/leaf.jpg")
        with image_stack.stack.client(KEY_A, url=image_stack.lenient_url) as client:
            response = client.post("/v1/jobs", json={"model": image_stack.model, "messages": [
                {"role": "user", "content": f"Picture 1:<img>{hop}</img>\nWhat leaf?"}]})
        assert response.status_code == 202, response.text
        assert [h.path for h in server.hits] == ["/short", "/leaf.jpg"]
    finally:
        server.close()
    assert url.endswith("/leaf.jpg")
    assert image_key(sha256_hex(jpeg)) in image_stack.object_keys()
    content = stored_request(image_stack, response.json()["id"])["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text"]
    assert content[1]["image"]["mime"] == "image/jpeg"


def test_get_image_route(image_stack: ImageStack) -> None:
    gif = image_bytes("GIF", (5, 5), (1, 2, 3))
    asyncio.run(_store_directly(image_stack, gif))
    sha = sha256_hex(gif)
    with image_stack.stack.client(KEY_B, url=image_stack.safe_url) as client:
        response = client.get(f"/v1/images/{sha}")
        assert response.status_code == 200
        assert response.content == gif
        assert response.headers["content-type"] == "image/gif"
        assert response.headers["etag"] == f'"{sha}"'
        assert_error(client.get(f"/v1/images/{'0' * 64}"), 404, "not_found")
        assert_error(client.get("/v1/images/../../etc"), 404)
        assert_error(client.get("/v1/images/XYZ"), 404, "not_found")
    with image_stack.stack.client("sk-wrong", url=image_stack.safe_url) as client:
        assert_error(client.get(f"/v1/images/{sha}"), 401, "invalid_api_key")


async def _store_directly(image_stack: ImageStack, data: bytes) -> None:
    env = image_stack.stack.env
    settings = ObjectStoreSettings(**{k.removeprefix("FERRY_").lower(): v
                                      for k, v in env.items() if k.startswith("FERRY_S3")
                                      or k == "FERRY_OBJECT_STORE"})
    objects = build_object_store(settings)
    images = ImageIntake(objects, LIMITS)
    await images.add(b64(data), param="p")
    await images.store()


def test_models_say_which_take_images(image_stack: ImageStack) -> None:
    with image_stack.stack.client(KEY_A, url=image_stack.safe_url) as client:
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[image_stack.model]["supports_images"] is True


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bad_image_requests(model: str, server: RecordingServer) -> list[tuple[str, Any, str, str]]:
    """(case, body, error code, API) — each also carries a good image first, which must not
    be stored either."""
    good = {"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG", (3, 3)))}}

    def with_part(url: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"}, good,
            {"type": "image_url", "image_url": {"url": url}}]}]}

    truncated = image_bytes("PNG", (64, 64))
    for n in range(3):
        server.redirect(f"/loop{n}", f"/loop{n + 1}")
    return [
        ("not an image", with_part(data_url(b"hello, I am text")), "invalid_image", "safe"),
        ("truncated", with_part(data_url(truncated[:-30])), "invalid_image", "safe"),
        ("decompression bomb", with_part(data_url(png_bomb())), "image_too_large", "safe"),
        ("over the pixel cap", with_part(data_url(image_bytes("PNG", (1200, 1000)))),
         "image_too_large", "safe"),
        ("too many images", {"model": model, "images": [b64(PNG)] * 4, "messages": [
            {"role": "user", "content": "<image><image><image><image>"}]},
         "too_many_images", "safe"),
        ("oversize base64", {"model": model, "images": [b64(os.urandom(300 * 1024))],
                             "messages": [{"role": "user", "content": "x"}]},
         "image_too_large", "safe"),
        ("malformed data URL", with_part("data:image/png;base64"), "invalid_image", "safe"),
        ("data URL of text", with_part("data:text/html;base64,PGI+aGk8L2I+"),
         "invalid_image", "safe"),
        ("local path in a tag", {"model": model, "messages": [
            {"role": "user", "content": "Picture 1:<img>/etc/passwd</img>"}]},
         "invalid_image", "safe"),
        ("file URL", with_part("file:///etc/passwd"), "image_url_forbidden", "safe"),
        ("unreachable URL", with_part(f"http://127.0.0.1:{_closed_port()}/x.png"),
         "invalid_image_url", "lenient"),
        ("URL answering 404", with_part(server.url("/missing.png")), "invalid_image_url",
         "lenient"),
        ("redirect loop", with_part(server.url("/loop0")), "invalid_image_url", "lenient"),
        ("placeholders and images disagree", {"model": model, "images": [b64(PNG)] * 2,
                                              "messages": [{"role": "user",
                                                            "content": "<image>"}]},
         "invalid_image", "safe"),
    ]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/chat/completions"])
def test_bad_images_are_4xx_and_leave_nothing_behind(
    image_stack: ImageStack, route: str
) -> None:
    server = RecordingServer("127.0.0.1")
    try:
        cases = bad_image_requests(image_stack.model, server)
        jobs_before, objects_before = job_rows(image_stack), image_stack.object_keys()
        for case, body, code, api in cases:
            url = image_stack.safe_url if api == "safe" else image_stack.lenient_url
            with image_stack.stack.client(KEY_A, url=url) as client:
                error = assert_error(client.post(route, json=body), 400, code)
            assert error["param"], case
            if code in ("image_too_large", "too_many_images"):
                assert "FERRY_IMAGE_" in error["message"], (case, error)
        assert job_rows(image_stack) == jobs_before
        assert image_stack.object_keys() == objects_before
    finally:
        server.close()


def test_errors_name_the_image_parameter(image_stack: ImageStack) -> None:
    body = {"model": image_stack.model, "images": [b64(PNG), "@@@"],
            "messages": [{"role": "user", "content": "x"}]}
    with image_stack.stack.client(KEY_A, url=image_stack.safe_url) as client:
        error = assert_error(client.post("/v1/jobs", json=body), 400, "invalid_image")
    assert error["param"] == "images.1"


def test_ferry_errors_are_400s() -> None:
    for exc in (InvalidImage("x"), ImageTooLarge("x"), TooManyImages("x"),
                ImageUrlRefused("x"), ImagesNotSupported("m", param="images")):
        assert isinstance(exc, FerryError) and exc.status_code == 400


def test_the_three_carriers_run_alike_on_the_vision_worker(
    stack: Stack, vision_model: str
) -> None:
    """`image_url` part, `<img>` tag and swift `images` store the same message; the worker
    reads the image back from S3 and the engine answers all three the same way."""
    noise = Image.frombytes("RGB", (64, 48), os.urandom(64 * 48 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    png = buffer.getvalue()
    question = "What is this?"
    sampling = {"max_tokens": 6, "temperature": 0}
    bodies = [
        {"model": vision_model, **sampling, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}},
            {"type": "text", "text": question}]}]},
        {"model": vision_model, **sampling, "messages": [
            {"role": "user", "content": f"<img>{b64(png)}</img>{question}"}]},
        {"model": vision_model, **sampling, "images": [b64(png)],
         "messages": [{"role": "user", "content": question}]},
    ]
    with stack.client() as client:
        jobs = [submit(client, body) for body in bodies]
        text_only = submit(client, {"model": vision_model, **sampling,
                                    "messages": [{"role": "user", "content": question}]})
        finals = [wait_job(client, job["id"], timeout=300) for job in jobs]
        plain = wait_job(client, text_only["id"], timeout=300)
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals
    assert len({f["result"]["text"] for f in finals}) == 1
    assert len({f["usage"]["prompt_tokens"] for f in finals}) == 1
    assert finals[0]["usage"]["prompt_tokens"] >= plain["usage"]["prompt_tokens"] + 16
    keys = stack_image_keys(stack)
    assert keys.count(image_key(sha256_hex(png))) == 1


def stack_image_keys(stack: Stack) -> list[str]:
    import boto3

    env = stack.env
    s3 = boto3.client("s3", endpoint_url=env["FERRY_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=env["FERRY_S3_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["FERRY_S3_SECRET_ACCESS_KEY"])
    listed = s3.list_objects_v2(Bucket=env["FERRY_S3_BUCKET"], Prefix="images/")
    return [o["Key"] for o in listed.get("Contents", [])]
