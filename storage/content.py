"""How a job's stored request carries images: the contract between api/ and worker/.

The API pulls every image into the object store before it accepts a job (see
api/images); the job row then holds references only. In `Job.request`:

- chat jobs: `messages[i]["content"]` is either a string, or a list of parts
      {"type": "text", "text": "..."}
      {"type": "image", "image": ImageRef}
- completion jobs: `prompt` is a string, or a list of the same parts (from `<img>` tags).

The worker reads each `ImageRef` back from the object store by `image_key(sha256)`, hands
the engine the decoded images in order of appearance, and keeps `{"type": "image"}`
placeholders where they were (the shape Hugging Face multimodal chat templates render).
"""

from __future__ import annotations

from typing import Any, TypedDict


class ImageRef(TypedDict):
    sha256: str
    mime: str
    width: int
    height: int


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(ref: ImageRef) -> dict[str, Any]:
    return {"type": "image", "image": dict(ref)}


def image_refs(content: str | list[dict[str, Any]] | None) -> list[ImageRef]:
    """The images a stored message content (or completion prompt) refers to, in order."""
    if not isinstance(content, list):
        return []
    return [part["image"] for part in content if part.get("type") == "image"]


def plain_text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a stored content, images left out."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a reply into (reasoning, content) at `<think>…</think>`, as vLLM's and
    FastDeploy's reasoning parsers do: text before `</think>` is reasoning (with or
    without the opening tag, which some chat templates put in the prompt); a reply with
    no `</think>` but an opening tag is all reasoning (it was cut off while thinking);
    otherwise there is no reasoning."""
    if THINK_CLOSE in text:
        reasoning, _, content = text.partition(THINK_CLOSE)
        reasoning = reasoning.split(THINK_OPEN, 1)[-1]
        return reasoning.strip("\n") or None, content.lstrip("\n")
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN):].lstrip("\n"), ""
    return None, text
