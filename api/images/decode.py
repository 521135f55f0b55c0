"""Where an image comes from: a data URL, an http(s) URL, or bare base64 (EAS `image`,
swift `images`, Qwen-VL `<img>` tags). Local paths are never read: text that is neither a
URL nor valid base64 is refused."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Literal

from api.images.errors import ImageTooLarge, ImageUrlRefused, InvalidImage

_URLSAFE = str.maketrans("-_", "+/")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


@dataclass(frozen=True, slots=True)
class ImageSource:
    """A classified image reference: bytes already in hand, or a URL still to fetch."""

    kind: Literal["bytes", "url"]
    data: bytes = b""
    url: str = ""


def base64_limit(max_bytes: int) -> int:
    """The longest base64 text (padding included) that can decode to `max_bytes`."""
    return 4 * -(-max_bytes // 3)


def decode_base64(text: str, *, max_bytes: int, param: str, what: str = "base64") -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated; the length is
    checked against the cap before anything is decoded."""
    compact = "".join(text.split())
    if len(compact) > base64_limit(max_bytes):
        raise ImageTooLarge(
            f"Image {what} is {len(compact)} characters, more than {max_bytes} bytes once "
            "decoded (limit FERRY_IMAGE_MAX_BYTES).",
            param=param,
        )
    if not compact:
        raise InvalidImage(f"Image {what} is empty.", param=param)
    if "-" in compact or "_" in compact:  # the URL-safe alphabet
        compact = compact.translate(_URLSAFE)
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"Image {what} is not valid base64.", param=param) from None
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"Image is {len(data)} bytes, more than {max_bytes} (limit FERRY_IMAGE_MAX_BYTES).",
            param=param,
        )
    return data


def decode_data_url(url: str, *, max_bytes: int, param: str) -> bytes:
    """`data:image/<type>;base64,<data>` (the declared type is not trusted: Pillow decides)."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise InvalidImage(
            "Malformed data URL: expected `data:image/<type>;base64,<data>`.", param=param
        )
    mime, *params = (p.strip().lower() for p in header.split(";"))
    if not mime.startswith("image/"):
        raise InvalidImage(
            f"Malformed data URL: media type `{mime or '(none)'}` is not an image/* type.",
            param=param,
        )
    if "base64" not in params:
        raise InvalidImage(
            "Malformed data URL: only base64 data URLs are accepted "
            "(`data:image/<type>;base64,<data>`).",
            param=param,
        )
    return decode_base64(payload, max_bytes=max_bytes, param=param, what="data URL")


def classify(source: str, *, max_bytes: int, param: str) -> ImageSource:
    """Decode inline images now (so a bad one fails before any fetch); leave URLs."""
    text = source.strip()
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else None
    if scheme == "data":
        return ImageSource("bytes", data=decode_data_url(text, max_bytes=max_bytes, param=param))
    if scheme in ("http", "https"):
        return ImageSource("url", url=text)
    if scheme is not None and len(scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ImageUrlRefused(
            f"Image URL scheme `{scheme}:` is not accepted; send an http(s) URL, a data: URL "
            "or base64.",
            param=param,
        )
    try:
        return ImageSource("bytes", data=decode_base64(text, max_bytes=max_bytes, param=param))
    except InvalidImage:
        raise InvalidImage(
            "Image is neither an http(s) URL, a data: URL nor valid base64 (local paths are "
            "never read).",
            param=param,
        ) from None
