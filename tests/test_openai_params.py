"""OpenAI parameters end to end (issue 13): sampling options on both engines, `n`,
`logprobs`, refused fields, and failed jobs answered 400 or 5xx by whose fault it was.

The engines' own behaviour for each option is tested in tests/test_engines.py; here each
option must reach the engine through the API, on a vLLM and a transformers worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ferry_testing.procs import start_worker
from tests.conftest import KEY_A, TINY, Stack
from tests.helpers import assert_error, chat_body, submit, wait_job
from worker.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.timeout(900)


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_model(TINY, model_cache))


def token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


@pytest.fixture(params=["vllm", "transformers"])
def model(request: pytest.FixtureRequest, stack: Stack) -> str:
    if request.param == "vllm":
        return TINY
    name: str = request.getfixturevalue("hf_model")
    return name


def ask(stack: Stack, model: str, content: str = "Tell me a story.", **extra: Any) -> Any:
    return sdk(stack).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **extra
    )


# --- sampling options ------------------------------------------------------------------


def test_sampling_options_reach_the_engine(stack: Stack, model: str, tokenizer: Any) -> None:
    river = token_id(tokenizer, " river")
    forced = ask(stack, model, max_tokens=5, temperature=0, logit_bias={str(river): 100})
    assert forced.choices[0].message.content == " river" * 5

    eos = str(token_id(tokenizer, "<|im_end|>"))
    ends = ask(stack, model, max_tokens=16, temperature=0, logit_bias={eos: 100})
    assert ends.usage is not None and ends.usage.completion_tokens <= 1
    held = ask(
        stack,
        model,
        max_tokens=16,
        temperature=0,
        logit_bias={eos: 100},
        extra_body={"min_tokens": 6},
    )
    assert held.usage is not None and held.usage.completion_tokens >= 6

    def sampled(seed: int) -> str:
        out = ask(stack, model, max_tokens=24, temperature=1.0, seed=seed)
        return str(out.choices[0].message.content)

    assert sampled(11) == sampled(11) != sampled(12)

    # min_p 1: only the likeliest token (or tokens tied with it) can be drawn.
    def picks(**extra: Any) -> list[tuple[float, float]]:
        out = ask(
            stack,
            model,
            max_tokens=24,
            temperature=1.0,
            seed=2,
            logprobs=True,
            top_logprobs=1,
            **extra,
        )
        content = out.choices[0].logprobs.content  # type: ignore[union-attr]
        return [(e.logprob, e.top_logprobs[0].logprob) for e in content or []]

    assert any(chosen < top - 1e-3 for chosen, top in picks())
    assert all(abs(chosen - top) < 1e-4 for chosen, top in picks(extra_body={"min_p": 1.0}))

    greedy = ask(stack, model, "Repeat", max_tokens=48, temperature=0).choices[0].message.content
    for extra in (
        {"extra_body": {"repetition_penalty": 1e4}},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
    ):
        changed = ask(stack, model, "Repeat", max_tokens=48, temperature=0, **extra)
        assert changed.choices[0].message.content != greedy, extra


# --- n ---------------------------------------------------------------------------------


def test_n_choices_each_with_its_seed(stack: Stack, model: str) -> None:
    with stack.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json=chat_body(model, max_tokens=12, temperature=1.0, seed=40, n=3),
        )
    assert response.status_code == 200, response.text
    out = response.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in out["choices"]]
    assert len(set(texts)) == 3
    job_ids = response.headers["X-Ferry-Job-Id"].split(",")
    assert len(job_ids) == 3 and out["id"] == f"chatcmpl-{job_ids[0]}"
    # Choice i is what seed + i gives alone; usage sums the choices.
    alone = [ask(stack, model, max_tokens=12, temperature=1.0, seed=40 + i) for i in range(3)]
    assert texts == [a.choices[0].message.content for a in alone]
    assert out["usage"]["completion_tokens"] == sum(
        a.usage.completion_tokens for a in alone if a.usage
    )
    assert out["usage"]["prompt_tokens"] == 3 * alone[0].usage.prompt_tokens  # type: ignore[union-attr]


def test_n_choices_streamed(stack: Stack) -> None:
    stream = sdk(stack).chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=1.0,
        seed=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage = ["", ""], [0, 0], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] += choice.finish_reason is not None
    assert finishes == [1, 1] and all(texts)
    plain = sdk(stack).chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=1.0,
        seed=5,
        n=2,
    )
    assert texts == [c.message.content for c in plain.choices]
    assert usage is not None and plain.usage is not None
    assert usage.total_tokens == plain.usage.total_tokens


def test_completions_n_per_prompt(stack: Stack) -> None:
    out = sdk(stack).completions.create(
        model=TINY, prompt=["The cat", "A road"], n=2, max_tokens=6, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    # Greedy: a prompt's choices agree; index = prompt x n + i.
    assert out.choices[0].text == out.choices[1].text
    assert out.choices[2].text == out.choices[3].text
    alone = sdk(stack).completions.create(model=TINY, prompt="A road", max_tokens=6, temperature=0)
    assert out.choices[2].text == alone.choices[0].text


# --- logprobs --------------------------------------------------------------------------


def _whole(text: str | None) -> str:
    """Text without U+FFFD: a token that ends inside a UTF-8 character is shown as U+FFFD
    by one engine (transformers decodes each token alone) and as nothing by the other
    (vLLM's decoded token), and the reply's text may show the broken character either way."""
    return (text or "").replace("\ufffd", "")


def test_chat_logprobs_plain_streamed_and_on_the_job(stack: Stack, model: str) -> None:
    out = ask(stack, model, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and out.usage is not None
    assert len(content) == out.usage.completion_tokens == 10
    assert _whole("".join(e.token for e in content)) == _whole(out.choices[0].message.content)
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    stream = sdk(stack).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                # Each chunk carries its own tokens' logprobs.
                assert _whole("".join(e.token for e in choice.logprobs.content)) == _whole(
                    choice.delta.content
                )
                streamed += choice.logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{out.id}").json()
    assert [e["token"] for e in job["result"]["logprobs"]["content"]] == [e.token for e in content]
    # Not asked for: none.
    assert ask(stack, model, max_tokens=4, temperature=0).choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(stack: Stack) -> None:
    prompt = "Once upon a time"
    out = sdk(stack).completions.create(
        model=TINY, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, echo=True
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert prompt + "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == len(prompt)
    assert all(len(top) <= 3 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    stream = sdk(stack).completions.create(
        model=TINY, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True
    )
    tokens, offsets = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens or []
            offsets += chunk.choices[0].logprobs.text_offset or []
    assert tokens == lp.tokens
    assert offsets == [o - len(prompt) for o in lp.text_offset]


# --- fields Ferry does not honour --------------------------------------------------------


def test_neutral_values_and_documented_extensions_are_accepted(stack: Stack) -> None:
    body = chat_body(
        TINY,
        max_tokens=2,
        use_beam_search=False,
        skip_special_tokens=True,
        store=False,
        stop_token_ids=[],
        tool_choice="none",
        parallel_tool_calls=False,
        user="u1",
        safety_identifier="s1",
        priority=1,
        metadata={"enable_thinking": False},
        chat_template_kwargs={"enable_thinking": False},
        ignore_eos=False,
        top_k=5,
        seed=3,
        min_p=0.0,
        repetition_penalty=1.0,
        min_tokens=0,
        logprobs=False,
        service_tier="auto",
    )
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


# --- failures: whose fault -----------------------------------------------------------------


def test_a_request_the_engine_refuses_is_a_400(stack: Stack) -> None:
    body = chat_body(TINY, max_tokens=2, logit_bias={str(10**7): 1})
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json=body)
        error = assert_error(response, 400, "generation_failed")
        assert error["type"] == "invalid_request_error"
        job = client.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_request"


def test_a_server_side_failure_is_a_500(stack: Stack, logs: Path) -> None:
    """A worker that gives up on every job (no attempts left) fails it for a reason that
    is not the request's: 500 server_error, streamed or not."""
    name = "ferry-tiny-gives-up"
    env = {**stack.env, "FERRY_MAX_ATTEMPTS": "0"}
    stack.procs.append(
        start_worker(
            "worker-gives-up", TINY, name, "transformers", env, logs, stack.worker_registered
        )
    )
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json=chat_body(name, max_tokens=2))
        error = assert_error(response, 500, "generation_failed")
        assert error["type"] == "server_error" and "gave up" in error["message"]
        job = client.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
        assert job["model"] == name and job["error"]["code"] == "server_error"
        with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(name, max_tokens=2, stream=True)
        ) as streamed:
            lines = [line for line in streamed.iter_lines() if line.startswith("data: {")]
        error_chunks = [json.loads(line[6:]) for line in lines if '"error"' in line]
        assert error_chunks and error_chunks[0]["error"]["type"] == "server_error"
        # The job's own job submission records the same.
        failed = wait_job(client, submit(client, chat_body(name, max_tokens=2))["id"])
        assert failed["error"]["code"] == "server_error"
    with httpx.Client(
        base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as client:
        out = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
    assert assert_error(out, 500)["type"] == "server_error"


# --- what the job keeps ----------------------------------------------------------------------


def test_a_replay_from_sql_carries_the_logprobs_and_the_error_code() -> None:
    from storage.events import EventType, JobEvent, events_from_job
    from storage.models import Job, JobStatus

    entries = [
        [{"token": "He", "logprob": -0.5, "top_logprobs": []}],
        [{"token": "llo", "logprob": -0.1, "top_logprobs": []}],
    ]
    live = JobEvent.delta("1-1", "He", 1.0, entries[0])
    assert JobEvent.from_json(live.to_json()).data["logprobs"] == entries[0]
    job = Job(
        id="job_x",
        attempts=1,
        status=JobStatus.SUCCEEDED,
        deltas=["He", "llo"],
        logprobs=entries,
        prompt_tokens=3,
        completion_tokens=2,
        finish_reason="stop",
    )
    deltas = [e.data for e in events_from_job(job) if e.type == EventType.DELTA]
    assert deltas == [
        {"text": "He", "logprobs": entries[0]},
        {"text": "llo", "logprobs": entries[1]},
    ]
    failed = Job(
        id="job_y",
        attempts=1,
        status=JobStatus.FAILED,
        error="bad bias",
        error_code="invalid_request",
    )
    assert events_from_job(failed)[-1].data == {"message": "bad bias", "code": "invalid_request"}
