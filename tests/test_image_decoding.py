"""Image intake, decoding and Pillow verification: every spelling of an image, the formats
kept, what is refused, and EXIF orientation."""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from api.images.errors import ImageTooLarge, ImageUrlRefused, InvalidImage
from api.images.verify import verify_image
from storage.objects import sha256_hex
from tests.fixtures.images import LIMITS, PNG, CountingStore, intake
from tests.imaging import animated_gif, b64, data_url, image_bytes, oriented_jpeg, png_bomb

# ---------------------------------------------------------------- decoding


async def test_data_url_and_base64_spellings_give_one_image(store: CountingStore) -> None:
    images = intake(store)
    encoded = b64(PNG)
    spellings = [
        data_url(PNG),
        data_url(PNG, "image/jpeg"),  # the declared type is not trusted
        encoded,
        encoded.rstrip("="),
        base64.urlsafe_b64encode(PNG).decode(),
    ]
    spaced = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    refs = [await images.add(s, param="p") for s in spellings[:2]]
    refs += [await intake(store).add(s, param="p") for s in [*spellings[2:], spaced]]
    assert {r["sha256"] for r in refs} == {sha256_hex(PNG)}
    assert refs[0] == {"sha256": sha256_hex(PNG), "mime": "image/png", "width": 16, "height": 12}


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("data:image/png;base64", "Malformed data URL"),
        ("data:text/plain;base64,aGVsbG8=", "not an image/* type"),
        ("data:;base64,aGVsbG8=", "not an image/* type"),
        ("data:image/png,%89PNG", "only base64 data URLs"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("not base64 at all!", "neither an http(s) URL"),
        ("", "empty"),
    ],
)
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
    for source in (
        str(real),
        "rose.jpg",
        "./rose.jpg",
        f"file://{real}",
        "C:\\rose.jpg",
        "~/rose.png",
    ):
        with pytest.raises((InvalidImage, ImageUrlRefused)):
            await intake(store).add(source, param="p")
    assert store.keys() == []


# ---------------------------------------------------------------- Pillow


@pytest.mark.parametrize(
    ("fmt", "mime", "save"),
    [
        ("PNG", "image/png", {}),
        ("JPEG", "image/jpeg", {"quality": 90}),
        ("WEBP", "image/webp", {}),
        ("GIF", "image/gif", {}),
        ("BMP", "image/bmp", {}),
    ],
)
def test_accepted_formats_are_stored_as_sent(fmt: str, mime: str, save: Any) -> None:
    data = image_bytes(fmt, (20, 10), **save)
    verified = verify_image(data, max_pixels=10_000, param="p")
    assert verified.data == data
    assert verified.ref == {"sha256": sha256_hex(data), "mime": mime, "width": 20, "height": 10}


@pytest.mark.parametrize(
    "data",
    [
        image_bytes("TIFF"),
        image_bytes("ICO"),
        image_bytes("PPM"),
        b"%PDF-1.4 not an image",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"GIF89a",
        b"",
    ],
    ids=["tiff", "ico", "ppm", "pdf", "svg", "gif-header-only", "empty"],
)
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


@pytest.mark.parametrize(
    ("orientation", "size", "top_red"),
    [
        (6, (20, 40), True),  # "rotate 90 CW to display": the left (red) half ends on top
        (8, (20, 40), False),  # "rotate 90 CCW": the right (blue) half ends on top
        (3, (40, 20), None),  # upside down: red ends on the right
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], top_red: bool | None
) -> None:
    data = oriented_jpeg((40, 20), orientation)
    verified = verify_image(data, max_pixels=10_000, param="p")
    assert verified.data != data
    assert (verified.ref["mime"], verified.ref["width"], verified.ref["height"]) == (
        "image/png",
        *size,
    )
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
