"""Taking one request's images in: decode or fetch, verify, then store them all.

`ImageIntake` holds one request's images. Each `add` classifies a source (data URL,
http(s) URL, bare base64), fetches or decodes it, and verifies it with Pillow, within the
request's limits; nothing is written until `store()`, so a request whose third image is
bad stores none of them. `store()` uploads each image under `image_key(sha256)` unless
that key already exists (the same image twice is stored once).

`ingest_image` and `ingest_parts` are the one-call forms other routes use (EAS `image`,
swift `images`, Qwen-VL `<img>` tags in a prompt); pass `intake=` to gather several calls
into one request's limits and store them together.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from api.images.addresses import parse_networks
from api.images.decode import classify
from api.images.errors import ImageTooLarge, InvalidImage, TooManyImages
from api.images.fetch import FetchPolicy, fetch_image_bytes
from api.images.verify import VerifiedImage, verify_image
from storage.content import ImageRef, image_part, text_part
from storage.objects import ObjectStore, image_key
from storage.repositories import images as images_repo
from storage.telemetry import span, traced

if TYPE_CHECKING:
    from api.core.db import Database
    from api.core.settings import ApiSettings
    from api.core.state import AppState

# Qwen-VL: `Picture 1:<img>https://…/rose.jpg</img>` (a URL, data URL or base64 inside).
IMG_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_per_request: int
    max_bytes: int
    max_pixels: int
    max_request_bytes: int
    fetch: FetchPolicy

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> ImageLimits:
        return cls(
            max_per_request=settings.image_max_per_request,
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            max_request_bytes=settings.image_max_request_bytes,
            fetch=FetchPolicy(
                timeout_seconds=settings.image_fetch_timeout_seconds,
                max_redirects=settings.image_fetch_max_redirects,
                max_bytes=settings.image_max_bytes,
                allowed_networks=parse_networks(settings.image_fetch_allow_networks),
            ),
        )


class ImageIntake:
    """One request's images: checked as they are added, stored together at the end."""

    def __init__(
        self,
        objects: ObjectStore,
        limits: ImageLimits,
        *,
        owner_id: str | None = None,
        db: Database | None = None,
    ) -> None:
        self.objects = objects
        self.limits = limits
        # Recorded as an owner of each stored image: only its owners may read it back.
        self._owner = (owner_id, db) if owner_id is not None and db is not None else None
        self.count = 0
        self.total_bytes = 0
        self._pending: dict[str, VerifiedImage] = {}

    @classmethod
    def for_state(cls, state: AppState, owner_id: str) -> ImageIntake:
        return cls(
            state.objects,
            ImageLimits.from_settings(state.settings),
            owner_id=owner_id,
            db=state.db,
        )

    def expect(self, count: int, *, param: str) -> None:
        """Refuse at once a request that carries too many images (before any fetch)."""
        if self.count + count > self.limits.max_per_request:
            raise TooManyImages(
                f"The request carries {self.count + count} images; at most "
                f"{self.limits.max_per_request} are allowed (limit "
                "FERRY_IMAGE_MAX_PER_REQUEST).",
                param=param,
            )

    @traced("ferry.image.intake")
    async def add(self, source: str, *, param: str) -> ImageRef:
        """Decode or fetch one image and verify it; its reference (nothing stored yet)."""
        self.expect(1, param=param)
        self.count += 1
        if not isinstance(source, str) or not source.strip():
            raise InvalidImage("Image is empty.", param=param)
        limits = self.limits
        found = classify(source, max_bytes=limits.max_bytes, param=param)
        data = found.data
        if found.kind == "url":
            data = await fetch_image_bytes(found.url, limits.fetch, param=param)
        self.total_bytes += len(data)
        if self.total_bytes > limits.max_request_bytes:
            raise ImageTooLarge(
                f"The request's images come to more than {limits.max_request_bytes} bytes "
                "(limit FERRY_IMAGE_MAX_REQUEST_BYTES).",
                param=param,
            )
        verified = await asyncio.to_thread(
            verify_image, data, max_pixels=limits.max_pixels, param=param
        )
        self._pending.setdefault(verified.ref["sha256"], verified)
        return verified.ref

    async def add_text(self, text: str, *, param: str) -> list[dict[str, Any]]:
        """Text with Qwen-VL `<img>…</img>` tags as stored parts (text and image), in
        order; text without tags is one text part (none for empty text)."""
        sources = IMG_TAG.findall(text)
        self.expect(len(sources), param=param)
        parts: list[dict[str, Any]] = []
        for index, piece in enumerate(IMG_TAG.split(text)):
            if index % 2 == 0:
                if piece:
                    parts.append(text_part(piece))
            else:
                parts.append(image_part(await self.add(piece, param=param)))
        return parts

    async def store(self) -> None:
        """Upload every verified image not stored yet (boto3 is blocking: a thread), and
        record the request's key as an owner of each (first: an image never exists
        without the owner who can read it)."""
        if not self._pending:
            return
        with span("ferry.image.store", **{"ferry.images": len(self._pending)}):
            if self._owner is not None:
                owner_id, db = self._owner
                async with db.transaction() as session:
                    await images_repo.add_owner(session, owner_id, list(self._pending))
            await asyncio.to_thread(self._store_all)

    def _store_all(self) -> None:
        for sha, image in self._pending.items():
            key = image_key(sha)
            if not self.objects.exists(key):
                self.objects.put_bytes(key, image.data, image.ref["mime"])
        self._pending.clear()


async def ingest_image(
    state: AppState, owner_id: str, source: str, *, param: str, intake: ImageIntake | None = None
) -> ImageRef:
    """One image (data URL, http(s) URL or bare base64) into the object store; its ref.

    With `intake`, the image counts towards that request's limits and is stored by
    `intake.store()` (call it once every image of the request has been added)."""
    own = intake is None
    intake = intake or ImageIntake.for_state(state, owner_id)
    ref = await intake.add(source, param=param)
    if own:
        await intake.store()
    return ref


async def ingest_parts(
    state: AppState, owner_id: str, text: str, *, param: str, intake: ImageIntake | None = None
) -> list[dict[str, Any]]:
    """Text with Qwen-VL `<img>…</img>` tags into stored parts (storage/content.py), the
    images pulled into the object store (URL, data URL or base64; never a local path)."""
    own = intake is None
    intake = intake or ImageIntake.for_state(state, owner_id)
    parts = await intake.add_text(text, param=param)
    if own:
        await intake.store()
    return parts
