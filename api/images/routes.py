"""`GET /v1/images/{sha256}`: a stored image's bytes, as the job and its conversation
refer to it (content-addressed: the SHA-256 of the stored bytes)."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter
from fastapi.responses import Response

from api.core.deps import CurrentKey, StateDep
from api.core.errors import NotFound, error_responses
from api.images.verify import sniff_mime
from storage.objects import ObjectNotFound, image_key
from storage.repositories import images as images_repo

router = APIRouter(tags=["images"])

_SHA256 = re.compile(r"[0-9a-f]{64}")


@router.get(
    "/v1/images/{sha256}",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "The image's bytes"},
        **error_responses(401, 404),
    },
)
async def get_image(sha256: str, key: CurrentKey, state: StateDep) -> Response:
    """The bytes of an image a request of this key sent, as stored (upright if it carried
    an EXIF rotation; the first frame if it was animated). Images are stored once by
    content, but only keys that sent an image may read it: to any other it is absent."""
    if not _SHA256.fullmatch(sha256):
        raise NotFound(f"No image with SHA-256 `{sha256[:80]}`.", param="sha256")
    async with state.db.read() as session:
        if not await images_repo.owns(session, key, sha256):
            raise NotFound(f"No image with SHA-256 `{sha256}`.", param="sha256")
    try:
        data = await asyncio.to_thread(state.objects.get_bytes, image_key(sha256))
    except ObjectNotFound:
        raise NotFound(f"No image with SHA-256 `{sha256}`.", param="sha256") from None
    mime = await asyncio.to_thread(sniff_mime, data)
    return Response(
        data,
        media_type=mime,
        headers={
            # Content-addressed: the bytes under this name never change.
            "Cache-Control": "private, max-age=31536000, immutable",
            "ETag": f'"{sha256}"',
            "X-Content-Type-Options": "nosniff",
        },
    )
