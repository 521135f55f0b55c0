"""PAI-EAS compatibility: the MLLM WebUI API and the "Transformers standard" LLM API.

Same queue, same engines, same keys as `/v1` (the token may be sent bare:
`Authorization: <key>`). Which model serves them: see `api.eas.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from api.conversations import history
from api.core import ratelimit
from api.core.deps import CurrentCaller, CurrentKey, SessionDep, StateDep
from api.core.errors import (
    ACCEPTED_RATE_HEADERS,
    FerryError,
    InvalidRequest,
    error_body,
    error_responses,
)
from api.core.limits import Caller
from api.core.nul import NUL_MESSAGE, find_nul
from api.core.state import AppState
from api.eas import service as eas
from api.eas.schemas import (
    ChatHistory,
    InferForwardRequest,
    InferForwardResponse,
    TransformersChatRequest,
    TransformersChatResponse,
)
from api.images import ImageIntake
from api.jobs import service as jobs_service
from storage.models import Job
from storage.repositories import conversations as conversations_repo

router = APIRouter(tags=["pai-eas"])

END_MARK = "##END"  # the MLLM client's `process_stream` splits the stream on it
EOS = "<EOS>"  # the WebSocket's end-of-answer message
# The MLLM client decodes every 100-byte read on its own: no write may split a character.
_MAX_WRITE_BYTES = 100


@router.post(
    "/infer_forward",
    response_model=InferForwardResponse,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "schema": {
                        "type": "string",
                        "description": "With `use_stream: true`: the answer so far, then "
                        "`##END`, repeated as it grows",
                    }
                }
            },
            "headers": ACCEPTED_RATE_HEADERS,
        },
        **error_responses(400, 401, 404, 413, 429, 500, 503, 504),
    },
)
async def infer_forward(
    body: InferForwardRequest, caller: CurrentCaller, state: StateDep, response: Response
) -> Any:
    """PAI-EAS MLLM: answer `prompt` (about `image`, if given) in the caller's default
    conversation, which keeps the history (`/get_history`, `/clear_history`, and
    `GET /v1/conversations`, where it is the one marked `default`).

    Not streamed: `{"response", "chat_history"}`. With `use_stream: true`: plain text,
    the answer so far followed by `##END`, repeated as it grows (the EAS client prints
    what each part adds); a failure ends it with `[error] <message>`. The turn is stored
    when the answer succeeds; the job's id is in the `X-Ferry-Job-Id` header.

    The model: `FERRY_EAS_MODEL`, else the first served model by name, or the first that
    takes images when the prompt carries one (this request's or the history's).
    """
    key = caller.id
    pairs = history.parse_pairs(body.chat_history, "chat_history")
    # Short units of its own, not the request's session: this route waits for the answer.
    async with state.db.read() as session:
        found = await conversations_repo.find_default(session, key)
        stored = await conversations_repo.messages_of(session, found.id) if found else []
        counted = await conversations_repo.reply_tokens(session, stored)
    # The EAS client sends back what /get_history gave it: then the stored history
    # (images included) is the one to use; any other history replaces it for this prompt.
    if not pairs or [list(pair) for pair in pairs] == history.pairs_of(stored):
        await history.record_image_use(state.db, key, stored)
        past, known = history.prompt_messages(stored), history.known_tokens(stored, counted)
    else:
        past, known = history.messages_from_pairs(pairs), []
    tokens = ratelimit.eas_tokens(
        [body.prompt], body.max_output_tokens, past=past, images=int(body.image is not None)
    )
    async with ratelimit.admission(state, caller, tokens=tokens, sync=True) as admitted:
        model = await eas.pick_model(
            state.catalog,
            state.settings.eas_model,
            with_image=body.image is not None or history.has_images(past),
        )
        images = ImageIntake.for_state(state, key)
        image = None
        if body.image is not None:
            eas.check_takes_images(model)
            image = await images.add(body.image, param="image")
        if not model.supports_images:
            past = history.without_images(past)
        turn = eas.Turn(
            prompt=body.prompt,
            image=image,
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
        )
        [job] = admitted.reserve([await eas.build_job(state, key, model, turn, past, None, known)])
    # Every check has passed: only now is anything stored.
    async with state.db.transaction() as session:
        job.conversation_id = (await conversations_repo.default_conversation(session, key)).id
    await images.store()
    await jobs_service.submit(state.intake, [job])
    headers = {"X-Ferry-Job-Id": job.id, **admitted.headers}
    if body.use_stream:
        return StreamingResponse(
            _mllm_stream(state, job.id), media_type="text/plain; charset=utf-8", headers=headers
        )
    response.headers.update(headers)
    text = (await eas.finished(state, job.id)).result_text or ""
    async with state.db.read() as session:
        chat_history = await _history_of(session, key)
    return InferForwardResponse(response=text, chat_history=chat_history)


async def _mllm_stream(state: AppState, job_id: str) -> AsyncIterator[bytes]:
    text = ""
    try:
        async for delta in eas.text_deltas(state, job_id):
            text += delta
            for piece in _writes(text + END_MARK):
                yield piece
    except FerryError as exc:
        for piece in _writes(f"{text}\n[error] {exc.message}{END_MARK}"):
            yield piece


def _writes(text: str) -> Iterator[bytes]:
    """`text` as UTF-8 writes of at most 100 bytes, each ending on a character boundary."""
    data = text.encode()
    start = 0
    while start < len(data):
        end = min(start + _MAX_WRITE_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # inside a character
            end -= 1
        yield data[start:end]
        start = end


@router.post("/get_history", response_model=ChatHistory, responses=error_responses(401))
async def get_history(key: CurrentKey, session: SessionDep) -> ChatHistory:
    """PAI-EAS MLLM: the caller's default conversation as `[[user, assistant], ...]`."""
    return ChatHistory(chat_history=await _history_of(session, key))


async def _history_of(session: AsyncSession, key: str) -> list[list[str]]:
    conversation = await conversations_repo.find_default(session, key)
    if conversation is None:
        return []
    return history.pairs_of(await conversations_repo.messages_of(session, conversation.id))


@router.post("/clear_history", response_class=PlainTextResponse, responses=error_responses(401))
async def clear_history(key: CurrentKey, session: SessionDep) -> str:
    """PAI-EAS MLLM: forget the caller's default conversation; answers `success`."""
    conversation = await conversations_repo.find_default(session, key)
    if conversation is not None:
        await conversations_repo.clear(session, conversation.id)
    return "success"


_TRANSFORMERS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": TransformersChatRequest.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
            },
            "text/plain": {
                "schema": {"type": "string", "description": "The prompt", "pattern": "\\S"}
            },
        },
    }
}


@router.post(
    "/",
    response_model=TransformersChatResponse,
    openapi_extra=_TRANSFORMERS_BODY,
    responses={
        200: {
            "content": {
                "application/octet-stream": {
                    "schema": {
                        "type": "string",
                        "description": "With `use_stream_chat` (the default for JSON): "
                        "the response's JSON objects, each followed by a NUL byte",
                    }
                }
            },
            "headers": ACCEPTED_RATE_HEADERS,
        },
        **error_responses(400, 401, 413, 429, 500, 503, 504),
    },
)
async def transformers_chat(
    request: Request, caller: CurrentCaller, state: StateDep, response: Response
) -> Any:
    """PAI-EAS "Transformers standard": a plain-text body is the prompt (answered
    whole); a JSON body (`Content-Type: application/json`) takes `prompt`,
    `system_prompt`, `history`, `temperature`, `top_k`, `top_p`, `max_new_tokens`,
    `do_sample`, `use_stream_chat` (default true).

    Answer: `{"response", "history"}`, history being the request's with this turn
    appended. Streamed: the same objects, each ending in a NUL byte, one per piece of
    text (`response` is the piece; `history` holds the answer so far); a failure ends
    the stream with an object carrying `error`. Nothing is stored: the client keeps the
    history. The job's id is in the `X-Ferry-Job-Id` header; the model is
    `FERRY_EAS_MODEL`, else the first served model by name.
    """
    body = await _transformers_body(request)
    pairs = history.parse_pairs(body.history, "history")
    async with _transformers_admission(state, caller, body, pairs) as admitted:
        [job] = admitted.reserve([await _transformers_job(state, caller.id, body, pairs)])
    await jobs_service.submit(state.intake, [job])
    headers = {"X-Ferry-Job-Id": job.id, **admitted.headers}
    if body.use_stream_chat:
        return StreamingResponse(
            _nul_stream(state, job.id, body.prompt, pairs),
            media_type="application/octet-stream",
            headers=headers,
        )
    response.headers.update(headers)
    text = (await eas.finished(state, job.id)).result_text or ""
    return TransformersChatResponse(response=text, history=_with_turn(pairs, body.prompt, text))


def _transformers_admission(
    state: AppState, caller: Caller, body: TransformersChatRequest, pairs: list[tuple[str, str]]
) -> contextlib.AbstractAsyncContextManager[ratelimit.Admission]:
    """The key's limits for one "Transformers standard" turn (api/core/ratelimit.py)."""
    texts = [body.prompt, body.system_prompt]
    tokens = ratelimit.eas_tokens(texts, body.max_new_tokens, pairs=pairs)
    return ratelimit.admission(state, caller, tokens=tokens, sync=True)


async def _transformers_body(request: Request) -> TransformersChatRequest:
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        try:
            prompt = raw.decode().strip()
        except UnicodeDecodeError:
            raise InvalidRequest("A plain-text request body must be UTF-8.") from None
        if not prompt:
            raise InvalidRequest(
                "Send the prompt as the request body (plain text), or a JSON object with `prompt`.",
                param="prompt",
            )
        return TransformersChatRequest(prompt=prompt, use_stream_chat=False)
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequest("Request body is not valid JSON.") from None
    return _parse_message(data)


def _parse_message(data: Any) -> TransformersChatRequest:
    if not isinstance(data, dict):
        raise InvalidRequest("The request must be a JSON object (or a plain-text prompt).")
    try:
        return TransformersChatRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _transformers_job(
    state: AppState,
    key: str,
    body: TransformersChatRequest,
    pairs: list[tuple[str, str]],
    pair_tokens: list[int | None] | None = None,
) -> Job:
    model = await eas.pick_model(state.catalog, state.settings.eas_model, with_image=False)
    turn = eas.Turn(
        prompt=body.prompt,
        system_prompt=body.system_prompt,
        max_tokens=body.max_new_tokens,
        temperature=body.temperature if body.do_sample else 0.0,
        top_p=body.top_p,
        top_k=body.top_k,
    )
    # A message's known size: a reply the connection got (None: estimate it).
    known = [n for reply in pair_tokens or [] for n in (None, reply)]
    return await eas.build_job(
        state, key, model, turn, history.messages_from_pairs(pairs), None, known
    )


def _with_turn(pairs: list[tuple[str, str]], prompt: str, answer: str) -> list[list[str]]:
    return [[user, assistant] for user, assistant in pairs] + [[prompt, answer]]


def _nul_json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\0"


async def _nul_stream(
    state: AppState, job_id: str, prompt: str, pairs: list[tuple[str, str]]
) -> AsyncIterator[bytes]:
    text = ""
    sent = False
    try:
        async for delta in eas.text_deltas(state, job_id):
            text += delta
            sent = True
            yield _nul_json({"response": delta, "history": _with_turn(pairs, prompt, text)})
    except FerryError as exc:
        yield _nul_json(
            {
                "response": "",
                "history": _with_turn(pairs, prompt, text),
                "error": error_body(exc.message, exc.type, exc.param, exc.code)["error"],
            }
        )
        return
    if not sent:
        yield _nul_json({"response": "", "history": _with_turn(pairs, prompt, text)})


@router.websocket("/")
async def transformers_websocket(websocket: WebSocket) -> None:
    """PAI-EAS "Transformers standard" over a WebSocket: each message is a JSON request
    (as for `POST /`; plain text is a prompt). With `use_stream_chat` (the default) the
    answer comes back as text messages, one per piece, then `<EOS>`; without, as one
    message. The connection keeps its history across rounds unless a message sends its
    own. A bad message gets one `{"error": ...}` message (then `<EOS>` if streamed)."""
    state: AppState = websocket.app.state.ferry
    try:
        caller = await state.keys.caller_of(websocket.headers.get("authorization"))
    except FerryError:
        await websocket.close(code=1008, reason="invalid API key")
        return
    await websocket.accept()
    past = _WebSocketHistory()
    # Messages are read as they arrive, not only between rounds, and answered in order.
    # uvicorn stops reading the socket while a received message waits for the app, so it
    # would not see the pong to its keepalive ping either and would drop the connection
    # (ping timeout, 20 s) in the middle of a long round. PAI-EAS's own client
    # (llm_websocket.py) sends all five of its rounds at once.
    inbox: asyncio.Queue[str | None] = asyncio.Queue()
    reader = asyncio.create_task(_read_messages(websocket, inbox))
    try:
        while (raw := await inbox.get()) is not None:
            await _websocket_round(websocket, state, caller, raw, past)
    except WebSocketDisconnect:
        return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
            await reader


async def _read_messages(websocket: WebSocket, inbox: asyncio.Queue[str | None]) -> None:
    """Every message's text into `inbox`, then None once the client has gone."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            inbox.put_nowait(
                message.get("text") or (message.get("bytes") or b"").decode(errors="replace")
            )
    finally:
        inbox.put_nowait(None)


@dataclass
class _WebSocketHistory:
    """A connection's rounds, and the tokens each answer took (None: not known)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    reply_tokens: list[int | None] = field(default_factory=list)


async def _websocket_round(
    websocket: WebSocket, state: AppState, caller: Caller, raw: str, past: _WebSocketHistory
) -> None:
    """Answer one message, and add the round to the connection's history.

    Streamed (the default): text pieces, then `<EOS>`. Not streamed: the whole answer
    as one message and nothing after it (the seed's non-streaming client closes on the
    first message it gets). An error is one message, `{"error": ...}`, followed by
    `<EOS>` when the request was (or would have been) streamed."""
    streamed = _streamed(raw)
    try:
        body = _websocket_message(raw)
        if body.history is not None:
            pairs = history.parse_pairs(body.history, "history")
            past.pairs, past.reply_tokens = pairs, [None] * len(pairs)
        # Over a limit: a 429's error as the message's answer (a WebSocket has no status).
        async with _transformers_admission(state, caller, body, past.pairs) as admitted:
            job = await _transformers_job(state, caller.id, body, past.pairs, past.reply_tokens)
            admitted.reserve([job])
        await jobs_service.submit(state.intake, [job])
        if streamed:
            async with contextlib.aclosing(eas.text_deltas(state, job.id)) as deltas:
                async for delta in deltas:
                    await websocket.send_text(delta)
        final = await eas.finished(state, job.id)
        await websocket.send_text(EOS if streamed else final.result_text or "")
    except (FerryError, RequestValidationError) as exc:
        await websocket.send_text(json.dumps(_error_of(exc)))
        if streamed:
            await websocket.send_text(EOS)
        return
    past.pairs.append((body.prompt, final.result_text or ""))
    past.reply_tokens.append(final.completion_tokens)


def _streamed(raw: str) -> bool:
    """Whether a message asks for a streamed answer (read even when it is invalid)."""
    try:
        data = json.loads(raw)
        return not isinstance(data, dict) or _BOOL.validate_python(
            data.get("use_stream_chat", True)
        )
    except (ValueError, ValidationError):
        return True


_BOOL = TypeAdapter(bool)


def _websocket_message(raw: str) -> TransformersChatRequest:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        if "\x00" in raw:
            raise InvalidRequest(f"The message {NUL_MESSAGE}.", param="prompt")
        if not raw.strip():
            raise InvalidRequest("Send a JSON request or a plain-text prompt.", param="prompt")
        return TransformersChatRequest(prompt=raw.strip())
    where = find_nul(data)  # (HTTP bodies were checked by RefuseNul already)
    if where is not None:
        raise InvalidRequest(f"`{where}` {NUL_MESSAGE}.", param=where)
    return _parse_message(data)


def _error_of(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, FerryError):
        return error_body(exc.message, exc.type, exc.param, exc.code)
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_body(message, "invalid_request_error", param, None)
