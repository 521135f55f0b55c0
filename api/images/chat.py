"""A chat request's messages as stored, with every image pulled in first.

Images reach a chat request three ways, all ending as `{"type": "image"}` parts
(storage/content.py) in the user message where they appeared:
- OpenAI `image_url` content parts (data URL or http(s) URL);
- Qwen-VL `<img>…</img>` tags inside user text (URL, data URL or base64);
- swift's top-level `images` list (URL or base64): each `<image>` placeholder in the user
  messages takes the next image, in order; with no placeholder, they all go before the
  last user message's text.
The request is checked whole (image count, placeholders, roles) before any image is
fetched, and nothing is stored unless every image is good.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.core.errors import InvalidRequest
from api.images.errors import ImagesNotSupported
from api.images.intake import IMG_TAG, ImageIntake
from api.openai.schemas import ChatCompletionRequest, ChatMessage, ImageUrlPart, TextPart
from storage.content import image_part, text_part
from storage.registry import ServedModel

SWIFT_PLACEHOLDER = "<image>"


@dataclass(slots=True)
class _Segment:
    """A piece of a message: text, or an image source still to take in."""

    text: str | None = None
    source: str | None = None
    param: str = ""


def plain_messages(body: ChatCompletionRequest, model: ServedModel) -> list[dict[str, Any]]:
    """Messages of a text-only request (content as one string); refuses images."""
    if body.images:
        raise ImagesNotSupported(model.name, param="images")
    messages = []
    for message in body.messages:
        if isinstance(message.content, list):
            if not all(isinstance(part, TextPart) for part in message.content):
                raise ImagesNotSupported(model.name, param="messages")
            content = "".join(p.text for p in message.content if isinstance(p, TextPart))
        else:
            content = message.content or ""
        messages.append({"role": message.role, "content": content})
    return messages


async def chat_messages(
    intake: ImageIntake, body: ChatCompletionRequest, model: ServedModel
) -> list[dict[str, Any]]:
    """The messages to store for `body`, every image fetched or decoded and verified into
    `intake` (the caller stores them with `intake.store()` once the whole request has
    passed). For a model that takes no images, any image is refused, and `<img>` tags are
    plain text."""
    if not model.supports_images:
        return plain_messages(body, model)
    planned = [_segments(index, message) for index, message in enumerate(body.messages)]
    _place_swift_images(body, planned)
    intake.expect(
        sum(seg.source is not None for segs in planned for seg in segs),
        param="images" if body.images else "messages",
    )
    messages = []
    for message, segments in zip(body.messages, planned, strict=True):
        messages.append({"role": message.role, "content": await _content(intake, segments)})
    return messages


def _segments(index: int, message: ChatMessage) -> list[_Segment]:
    content = message.content
    if content is None or isinstance(content, str):
        return _split_tags(content or "", message.role, f"messages.{index}.content")
    segments: list[_Segment] = []
    for number, part in enumerate(content):
        param = f"messages.{index}.content.{number}"
        if isinstance(part, TextPart):
            segments += _split_tags(part.text, message.role, f"{param}.text")
            continue
        # Video, audio and file parts were refused before (api.jobs.service).
        assert isinstance(part, ImageUrlPart)
        if message.role != "user":
            raise InvalidRequest(
                f"Image parts are only accepted in user messages, not `{message.role}`.",
                param=param,
                code="invalid_image",
            )
        segments.append(_Segment(source=part.image_url.url, param=f"{param}.image_url.url"))
    return segments


def _split_tags(text: str, role: str, param: str) -> list[_Segment]:
    """User text with Qwen-VL `<img>` tags split into text and image segments."""
    if role != "user" or "<img>" not in text:
        return [_Segment(text=text)]
    pieces = IMG_TAG.split(text)
    return [
        _Segment(text=p) if i % 2 == 0 else _Segment(source=p, param=param)
        for i, p in enumerate(pieces)
    ]


def _place_swift_images(body: ChatCompletionRequest, planned: list[list[_Segment]]) -> None:
    images = body.images or []
    if not images:
        return
    user_indexes = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not user_indexes:
        raise InvalidRequest(
            "`images` needs a user message to go with.", param="images", code="invalid_image"
        )
    placeholders = sum(
        (seg.text or "").count(SWIFT_PLACEHOLDER) for i in user_indexes for seg in planned[i]
    )
    queue = [_Segment(source=src, param=f"images.{n}") for n, src in enumerate(images)]
    if placeholders == 0:
        planned[user_indexes[-1]][:0] = queue
        return
    if placeholders != len(images):
        raise InvalidRequest(
            f"`images` has {len(images)} images but the user messages have {placeholders} "
            f"`{SWIFT_PLACEHOLDER}` placeholders; give one image per placeholder, or no "
            "placeholders.",
            param="images",
            code="invalid_image",
        )
    for i in user_indexes:
        planned[i] = [out for seg in planned[i] for out in _fill_placeholders(seg, queue)]


def _fill_placeholders(segment: _Segment, queue: list[_Segment]) -> list[_Segment]:
    if segment.text is None or SWIFT_PLACEHOLDER not in segment.text:
        return [segment]
    pieces = segment.text.split(SWIFT_PLACEHOLDER)
    out = [_Segment(text=pieces[0])]
    for piece in pieces[1:]:
        out += [queue.pop(0), _Segment(text=piece)]
    return out


async def _content(intake: ImageIntake, segments: list[_Segment]) -> str | list[dict[str, Any]]:
    """A string when the message has no image (as text-only requests are stored), else
    parts with neighbouring text joined."""
    if all(seg.source is None for seg in segments):
        return "".join(seg.text or "" for seg in segments)
    parts: list[dict[str, Any]] = []
    for seg in segments:
        if seg.source is not None:
            parts.append(image_part(await intake.add(seg.source, param=seg.param)))
        elif seg.text:
            if parts and parts[-1]["type"] == "text":
                parts[-1] = text_part(parts[-1]["text"] + seg.text)
            else:
                parts.append(text_part(seg.text))
    return parts
