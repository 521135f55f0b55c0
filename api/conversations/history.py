"""Chat history in prompts: stored conversations and client-sent `[user, assistant]` pairs.

A job that continues a conversation stores its whole prompt (`StoredRequest.messages`:
the instructions, the history, then the new turn) and where the new turn starts
(`StoredRequest.turn_start`). Nothing is written to the conversation at submit: when the job
succeeds, `storage.repositories.conversations.record_reply` appends the turn and the reply
together, so a failed or cancelled job leaves no dangling user turn behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from api.core.db import Database
from api.core.errors import InvalidRequest, NotFound
from storage.content import ImageRef, image_part, image_refs, plain_text, text_part
from storage.models import Message
from storage.repositories import conversations as conversations_repo
from storage.repositories import images as images_repo
from storage.repositories.conversations import INSTRUCTION_ROLES
from storage.stored_request import StoredRequest

Pair = tuple[str, str]


async def prepend_history(
    db: Database, owner_id: str, conversation_id: str, request: StoredRequest
) -> None:
    """Put the stored conversation before the request's new messages (404 if this key
    has no such conversation)."""
    async with db.read() as session:
        conversation = await conversations_repo.get_owned(session, conversation_id, owner_id)
        if conversation is None:
            raise NotFound(f"No conversation with id `{conversation_id}`.", param="conversation_id")
        stored = await conversations_repo.messages_of(session, conversation_id)
    await record_image_use(db, owner_id, stored)
    splice(request, prompt_messages(stored))


async def record_image_use(db: Database, owner_id: str, stored: Sequence[Message]) -> None:
    """The stored turns' images are about to be in a new job: mark them used now (the
    retention sweep's reference check reads only jobs made before an image's last use)."""
    shas = {ref["sha256"] for m in stored for ref in m.images or []}
    if shas:
        async with db.transaction() as session:
            await images_repo.add_owner(session, owner_id, shas)


def splice(request: StoredRequest, history: Sequence[dict[str, Any]]) -> None:
    """Insert history after the leading instructions (system prompts stay first, where
    chat templates want them) and mark where the new turn starts."""
    messages = request.messages or []
    lead = _leading_instructions(messages)
    request.messages = [*messages[:lead], *history, *messages[lead:]]
    request.turn_start = lead + len(history)


def prompt_messages(stored: Sequence[Message]) -> list[dict[str, Any]]:
    """Stored messages as prompt messages: a user turn's images come back as image parts
    (before its text); an assistant turn is its content only (reasoning left out, as
    reasoning models' templates expect)."""
    messages = []
    for message in stored:
        refs: list[ImageRef] = list(message.images or [])  # type: ignore[arg-type]
        content: str | list[dict[str, Any]] = message.content
        if refs:
            content = [*(image_part(ref) for ref in refs), text_part(message.content)]
        messages.append({"role": message.role, "content": content})
    return messages


def has_images(messages: Sequence[dict[str, Any]]) -> bool:
    return any(image_refs(m.get("content")) for m in messages)


def without_images(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as text, for a model that takes no images."""
    return [{**m, "content": plain_text(m.get("content"))} for m in messages]


def pairs_of(stored: Sequence[Message]) -> list[list[str]]:
    """A conversation as PAI-EAS `chat_history`: `[[user, assistant], ...]` (text only)."""
    pairs: list[list[str]] = []
    asked: list[str] = []
    for message in stored:
        if message.role == "user":
            asked.append(message.content)
        elif message.role == "assistant":
            pairs.append(["\n".join(asked), message.content])
            asked = []
    if asked:
        pairs.append(["\n".join(asked), ""])
    return pairs


def messages_from_pairs(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for user, assistant in pairs:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return messages


def parse_pairs(value: Any, param: str) -> list[Pair]:
    """A client-sent history: a list of `[user, assistant]` pairs of strings, else 400.

    Empty items are skipped: PAI-EAS documents `[()]` as the default history."""
    problem = (
        f"`{param}` must be a list of [user, assistant] pairs of strings, "
        'e.g. [["Hello", "Hi! How can I help?"]]'
    )
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"{problem}; got {type(value).__name__}.", param=param)
    pairs: list[Pair] = []
    for index, item in enumerate(value):
        if isinstance(item, list | tuple) and len(item) == 0:
            continue
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not all(isinstance(text, str) for text in item)
        ):
            raise InvalidRequest(
                f"{problem}; item {index} is {_describe(item)}.", param=f"{param}.{index}"
            )
        pairs.append((item[0], item[1]))
    return pairs


def _describe(item: Any) -> str:
    if isinstance(item, list | tuple):
        return f"a list of {len(item)} item(s) ({', '.join(type(x).__name__ for x in item)})"
    return f"a {type(item).__name__}"


def _leading_instructions(messages: Sequence[dict[str, Any]]) -> int:
    lead = 0
    while lead < len(messages) and messages[lead]["role"] in INSTRUCTION_ROLES:
        lead += 1
    return lead


# A conservative prompt-size estimate for APIs whose token limit is a ceiling (PAI-EAS):
# text costs at most one token per UTF-8 byte with byte-level tokenizers; a chat template
# adds a few tokens per message; an image costs what its vision encoder makes of it. A
# stored reply's size is known exactly: its job counted its tokens.
_TEMPLATE_TOKENS = 64
_MESSAGE_TOKENS = 8
IMAGE_TOKENS = 1024


def estimated_tokens(message: dict[str, Any]) -> int:
    content = message.get("content")
    return (
        _MESSAGE_TOKENS
        + len(plain_text(content).encode())
        + IMAGE_TOKENS * len(image_refs(content))
    )


def known_tokens(stored: Sequence[Message], reply_tokens: dict[str, int]) -> list[int | None]:
    """For each stored message, its token count when its job counted it (replies)."""
    return [
        reply_tokens.get(m.job_id) if m.role == "assistant" and m.job_id else None for m in stored
    ]


def fit_to_context(
    request: StoredRequest,
    max_model_len: int,
    wanted: int,
    history_tokens: Sequence[int | None] = (),
) -> None:
    """Make a prompt and its output ceiling fit the model's context, PAI-EAS style.

    The oldest history turns are left out of the prompt (never out of the stored
    conversation) until the prompt leaves room for `min(wanted, context / 4)` tokens;
    then `max_tokens` is `wanted`, lowered to what is left. A new turn that does not fit
    on its own is a 400. `history_tokens` gives the history messages' token counts where
    they are known (else they are estimated).
    """
    messages = request.messages or []
    lead = _leading_instructions(messages)
    start = lead if request.turn_start is None else request.turn_start
    history = messages[lead:start]
    known = [*history_tokens, *([None] * len(history))][: len(history)]
    sizes = [
        estimated_tokens(m) if n is None else _MESSAGE_TOKENS + n
        for m, n in zip(history, known, strict=True)
    ]
    fixed = _TEMPLATE_TOKENS + sum(estimated_tokens(m) for m in messages[:lead] + messages[start:])
    room = min(wanted, max(1, max_model_len // 4))
    drop = 0
    while drop < len(history) and fixed + sum(sizes[drop:]) + room > max_model_len:
        drop += 1
        # History always opens with a user turn.
        while drop < len(history) and history[drop]["role"] != "user":
            drop += 1
    request.messages = messages[:lead] + messages[lead + drop :]
    request.turn_start = start - drop
    left = max_model_len - fixed - sum(sizes[drop:])
    if left < 1:
        raise InvalidRequest(
            f"The prompt is too long for the model's context of {max_model_len} tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    request.max_tokens = min(wanted, left)
