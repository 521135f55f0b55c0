"""How a job's stored request carries images: the contract between api/ and worker/.

The API pulls every image into the object store before it accepts a job (see
api/images); the job row then holds references only. In `Job.request`
(storage/stored_request.py):

- chat jobs: `messages[i]["content"]` is either a string, or a list of parts
      {"type": "text", "text": "..."}
      {"type": "image", "image": ImageRef}
- completion jobs: `prompt` is a string, or a list of the same parts (from `<img>` tags).

The worker reads each `ImageRef` back from the object store by `image_key(sha256)`, hands
the engine the decoded images in order of appearance, and keeps `{"type": "image"}`
placeholders where they were (the shape Hugging Face multimodal chat templates render).
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


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

# How a reply's reasoning is split out (stored in a job's request as `reasoning`):
# "tagged": only a reply that opens with `<think>` (thinking asked for, no parser);
# "parser": the model has a reasoning parser, so the reply starts inside its reasoning
#     (templates that open `<think>` in the prompt): reasoning runs up to `</think>`.
ReasoningMode = Literal["tagged", "parser"]


def split_reasoning(text: str, mode: ReasoningMode = "tagged") -> tuple[str | None, str]:
    """Split a reply into (reasoning, content), as vLLM's and FastDeploy's reasoning
    parsers do for models that think inside `<think>…</think>`.

    A reply that opens with `<think>` (after whitespace) is reasoning up to `</think>`
    and content after it; one cut off before `</think>` is all reasoning. In "parser"
    mode a reply without the opening tag is read the same way (it began inside the
    reasoning: text up to `</think>`, all of it if none comes, as vLLM's parsers do); in
    "tagged" mode it is all content.
    `ReasoningSplitter` gives the same split incrementally, for streams."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN) :]
    elif mode == "parser":
        body = text
    else:
        return None, text
    reasoning, closed, content = body.partition(THINK_CLOSE)
    reasoning = reasoning.strip("\n")
    return reasoning or None, content.lstrip("\n") if closed else ""


class ReasoningSplitter:
    """`split_reasoning` for a stream: feed text deltas, get (reasoning, content) pieces
    whose concatenations equal what `split_reasoning` gives for the whole text."""

    def __init__(self, mode: ReasoningMode = "tagged") -> None:
        self._mode = mode
        self._state = "start"  # start -> reasoning -> content, or start -> content
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning = content = ""
        if self._state == "start":
            stripped = self._held.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._state = "think-start"
                self._held = stripped[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(stripped):
                return "", ""  # whitespace or a partial "<think": wait for more
            elif self._mode == "parser":
                self._state = "think-start"  # no opening tag: it began inside reasoning
            else:
                self._state = "content"
        if self._state == "think-start":
            self._held = self._held.lstrip("\n")
            if not self._held:
                return "", ""
            self._state = "reasoning"
        if self._state == "reasoning":
            if THINK_CLOSE in self._held:
                before, _, after = self._held.partition(THINK_CLOSE)
                reasoning = before.rstrip("\n")
                self._state = "after-think"
                self._held = after
            else:
                reasoning, self._held = _hold_back(self._held)
                return reasoning, ""
        if self._state == "after-think":
            self._held = self._held.lstrip("\n")
            if not self._held:
                return reasoning, ""
            self._state = "content"
        if self._state == "content":
            content, self._held = self._held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end of the stream: what was held back (a trailing newline, a partial tag)."""
        held, self._held = self._held, ""
        if self._state == "start":
            return (held.strip("\n"), "") if self._mode == "parser" else ("", held)
        if self._state == "reasoning":
            return held.rstrip("\n"), ""
        return "", ""  # think-start / after-think hold only newlines


def _hold_back(text: str) -> tuple[str, str]:
    """Split reasoning text into what is safe to emit now and what must wait: trailing
    newlines (dropped if `</think>` follows) and a partial `</think>`."""
    keep = 0
    for size in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1):
        if THINK_CLOSE.startswith(text[-size:]):
            keep = size
            break
    body, tail = text[: len(text) - keep], text[len(text) - keep :]
    stripped = body.rstrip("\n")
    return stripped, body[len(stripped) :] + tail
