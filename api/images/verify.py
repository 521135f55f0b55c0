"""Pillow checks every image before it is stored, and decides the bytes that are stored.

- Formats: PNG, JPEG, WEBP, GIF, BMP only (Pillow is told to try no other decoder).
- Pixels: width x height is read from the header and checked against the cap BEFORE any
  pixel is decoded; Pillow's own decompression-bomb guard is a second net.
- Integrity: `verify()` (PNG checksums, structure), then a full decode of the first frame
  (truncated data fails here).
- What is stored: the original bytes, unchanged, when they can be used as they are — the
  usual case, and the one that keeps JPEGs unrecompressed. Two cases are re-encoded as
  PNG (lossless): an EXIF orientation other than "normal" (the pixels are turned upright
  with `ImageOps.exif_transpose`, so engines, which ignore EXIF, see what the sender saw),
  and animated images (GIF/WEBP/APNG/MPO: the first frame is what a model is given).
The content address is the SHA-256 of the stored bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from api.images.errors import ImageTooLarge, InvalidImage
from storage.content import ImageRef
from storage.objects import sha256_hex

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MIME_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


@dataclass(frozen=True, slots=True)
class VerifiedImage:
    data: bytes  # the bytes to store
    ref: ImageRef

    @property
    def size(self) -> int:
        return len(self.data)


def verify_image(data: bytes, *, max_pixels: int, param: str) -> VerifiedImage:
    """Check `data` and return what to store; raises InvalidImage or ImageTooLarge.
    CPU-bound: call it through `asyncio.to_thread`."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            _check_pixels(probe.size, max_pixels, param)
            probe.verify()
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            image.load()
            return _normalized(data, image)
    except (ImageTooLarge, InvalidImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(
            "Image claims more pixels than Pillow will decode (a decompression bomb); "
            f"the limit is FERRY_IMAGE_MAX_PIXELS={max_pixels}.",
            param=param,
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(
            "Data is not an image in an accepted format (PNG, JPEG, WEBP, GIF, BMP).", param=param
        ) from None
    except Exception:
        # Any failure to decode untrusted bytes (truncated, corrupt) is the sender's.
        raise InvalidImage(
            "Image is truncated or corrupt: it could not be decoded.", param=param
        ) from None


def _check_pixels(size: tuple[int, int], max_pixels: int, param: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"Image has no pixels ({width}x{height}).", param=param)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"Image is {width}x{height} = {width * height} pixels, more than {max_pixels} "
            "(limit FERRY_IMAGE_MAX_PIXELS).",
            param=param,
        )


def _normalized(original: bytes, image: Image.Image) -> VerifiedImage:
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    needs_turn = orientation in range(2, 9)
    animated = bool(getattr(image, "is_animated", False))
    if not needs_turn and not animated:
        assert image.format is not None
        return _verified(original, MIME_TYPES[image.format], image.size)
    upright = ImageOps.exif_transpose(image) if needs_turn else image.copy()
    if upright.mode not in _PNG_MODES:
        upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
    buffer = io.BytesIO()
    upright.save(buffer, format="PNG")
    return _verified(buffer.getvalue(), "image/png", upright.size)


def _verified(data: bytes, mime: str, size: tuple[int, int]) -> VerifiedImage:
    width, height = size
    return VerifiedImage(
        data, ImageRef(sha256=sha256_hex(data), mime=mime, width=width, height=height)
    )


def sniff_mime(data: bytes) -> str:
    """The content type of stored image bytes (header only; nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            return MIME_TYPES.get(image.format or "", "application/octet-stream")
    except Exception:
        return "application/octet-stream"
