"""Image+text: the tiny Idefics3-shaped model, both engines on images, and image jobs end
to end (API intake -> object store -> worker -> engine).

The engine tests run once per engine (module-scoped, parametrized fixture, as in
tests/test_engines.py) on the session event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import pytest_asyncio
from PIL import Image

from storage.repositories.jobs import new_job_id
from tests.conftest import Stack
from tests.helpers import abort_after_first_delta, running_engine, submit, wait_job
from worker.engines import (
    Delta,
    Engine,
    GenerationRequest,
    SamplingOptions,
)
from worker.engines.common import ImageSupport, prompt_token_ids
from worker.errors import EngineRequestError
from worker.models import tiny
from worker.models.tiny import ensure_tiny_model

pytestmark = [pytest.mark.timeout(900)]

VISION = "ferry-tiny-vision"
MAX_MODEL_LEN = 512
# Per image: <fake_token_around_image><global-img>, 16 x <image>, <fake_token_around_image>.
TOKENS_PER_IMAGE = tiny.VISION_IMAGE_SEQ_LEN + 3


def noise(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (150, 100)) -> Image.Image:
    return Image.new("RGB", size, color)


def ask(
    images: list[Image.Image], text: str = "What is in the picture?", **sampling: Any
) -> GenerationRequest:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": text})
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        messages=[{"role": "user", "content": content}],
        sampling=SamplingOptions(**{"max_tokens": 16, "temperature": 0, **sampling}),
        images=tuple(images),
    )


async def collect(engine: Engine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


# --- the model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_dir(model_cache: Path) -> Path:
    return ensure_tiny_model(VISION, model_cache)


def test_builder_makes_an_idefics3_model_both_libraries_load(vision_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config: Any = AutoConfig.from_pretrained(vision_dir)
    assert config.model_type == "idefics3"
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (128, 2, 64)
    assert config.vision_config.image_size == 112 and config.vision_config.patch_size == 14
    processor: Any = AutoProcessor.from_pretrained(vision_dir)
    assert type(processor).__name__ == "Idefics3Processor"
    assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    tok = processor.tokenizer
    for special in (
        tiny.IMAGE_TOKEN,
        tiny.FAKE_IMAGE_TOKEN,
        tiny.GLOBAL_IMAGE_TOKEN,
        tiny.END_OF_UTTERANCE,
        "<row_1_col_1>",
    ):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert config.image_token_id == tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"
    inputs = processor(text=[rendered], images=[[noise(1, (300, 200))]], return_tensors="pt")
    assert inputs["pixel_values"].shape[-3:] == (3, 112, 112)  # one image, not split
    assert (inputs["input_ids"][0] == config.image_token_id).sum() == tiny.VISION_IMAGE_SEQ_LEN
    model: Any = AutoModelForImageTextToText.from_pretrained(vision_dir)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"


def test_builder_is_reproducible(vision_dir: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(VISION, tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (vision_dir / name).read_bytes(), name


def test_prompt_placeholders_must_match_images(vision_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(vision_dir)
    support = ImageSupport(tiny.IMAGE_TOKEN, tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN))
    two = ask([solid((1, 2, 3)), noise(2)])
    assert prompt_token_ids(tok, two, support).count(support.token_id) == 2
    with pytest.raises(EngineRequestError, match="1 image placeholder"):
        prompt_token_ids(
            tok,
            GenerationRequest("x", messages=ask([noise(1)]).messages, images=(noise(1), noise(2))),
            support,
        )
    with pytest.raises(EngineRequestError, match="does not take images"):
        prompt_token_ids(tok, two, None)
    # A completion prompt given as parts: the image part becomes the model's placeholder.
    parts = [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "!"}]
    ids = prompt_token_ids(tok, GenerationRequest("y", prompt=parts, images=(noise(3),)), support)
    assert ids == tok.encode(f"Look: {tiny.IMAGE_TOKEN}!")


# --- both engines ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["vllm", "transformers"])
async def engine(request: pytest.FixtureRequest, model_cache: Path) -> AsyncIterator[Engine]:
    async with running_engine(VISION, request.param, model_cache, MAX_MODEL_LEN) as eng:
        yield eng


@pytest.mark.engine
async def test_engine_says_it_takes_images(engine: Engine) -> None:
    assert engine.info.supports_images
    assert engine.info.name == VISION


@pytest.mark.engine
async def test_the_image_reaches_the_model(engine: Engine) -> None:
    """Same prompt, greedy: different images give different answers, the same image the
    same answer (so the difference comes from the pixels, not from chance)."""
    images = [solid((255, 0, 0)), solid((0, 0, 255)), noise(7), noise(8)]
    answers = [text_of(await collect(engine, ask([img]))) for img in images]
    assert all(answers), answers
    assert len(set(answers)) == len(images), answers
    again = text_of(await collect(engine, ask([noise(7)])))
    assert again == answers[2]


@pytest.mark.engine
async def test_prompt_tokens_count_the_image_tokens(engine: Engine, vision_dir: Path) -> None:
    from transformers import AutoProcessor

    processor: Any = AutoProcessor.from_pretrained(vision_dir)
    one_image = ask([noise(1)], max_tokens=4)
    one = (await collect(engine, one_image))[0].prompt_tokens
    two = (await collect(engine, ask([noise(1), noise(2)], max_tokens=4)))[0].prompt_tokens
    # As many as the model's own processor makes of the prompt and its image.
    text = processor.apply_chat_template(one_image.messages, add_generation_prompt=True)
    expanded = processor(text=[text], images=[[noise(1)]])["input_ids"][0]
    assert one == len(expanded)
    assert two == one + TOKENS_PER_IMAGE


@pytest.mark.engine
async def test_concurrent_image_requests_are_batched(engine: Engine) -> None:
    """8 image requests at once run together: their active intervals (first to last delta)
    all overlap, which a one-at-a-time engine cannot do."""
    requests = [ask([noise(100 + i)], f"Describe image {i}.", max_tokens=32) for i in range(8)]
    intervals: list[tuple[float, float]] = []

    async def run(request: GenerationRequest) -> list[Delta]:
        deltas: list[Delta] = []
        first = 0.0
        async for delta in engine.generate(request):
            first = first or time.perf_counter()
            deltas.append(delta)
        intervals.append((first, time.perf_counter()))
        return deltas

    results = await asyncio.gather(*(run(r) for r in requests))
    assert all(sum(d.new_tokens for d in deltas) > 1 for deltas in results)
    latest_start = max(start for start, _ in intervals)
    earliest_end = min(end for _, end in intervals)
    assert latest_start < earliest_end, intervals
    # Batching must not mix requests up: each answer is what it is alone.
    alone = text_of(await collect(engine, requests[5]))
    assert text_of(results[5]) == alone


@pytest.mark.engine
async def test_image_requests_mix_with_text_requests(engine: Engine) -> None:
    text = GenerationRequest(
        uuid.uuid4().hex,
        prompt="Once upon a time",
        sampling=SamplingOptions(max_tokens=12, temperature=0),
    )
    parts = [{"type": "text", "text": "Look: "}, {"type": "image"}]
    completion = GenerationRequest(
        uuid.uuid4().hex,
        prompt=parts,
        images=(noise(5),),
        sampling=SamplingOptions(max_tokens=12, temperature=0),
    )
    results = await asyncio.gather(
        collect(engine, text),
        collect(engine, completion),
        collect(engine, ask([noise(6)])),
        collect(engine, ask([noise(6)], temperature=0.9, top_p=0.9, seed=1)),
    )
    for deltas in results:
        assert deltas[-1].finish_reason in ("stop", "length")
        assert sum(d.new_tokens for d in deltas) > 0


@pytest.mark.engine
async def test_abort_an_image_request(engine: Engine) -> None:
    request = ask([noise(9)], max_tokens=MAX_MODEL_LEN - 64)
    deltas = await abort_after_first_delta(engine, request)
    assert deltas[-1].finish_reason == "abort"
    assert sum(d.new_tokens for d in deltas) < MAX_MODEL_LEN - 64


@pytest.mark.engine
async def test_bad_image_requests_are_refused(engine: Engine) -> None:
    one_placeholder = ask([noise(1)])
    with pytest.raises(EngineRequestError, match="image"):
        await collect(
            engine,
            GenerationRequest(
                uuid.uuid4().hex, messages=one_placeholder.messages, images=(noise(1), noise(2))
            ),
        )
    with pytest.raises(EngineRequestError, match="context"):
        await collect(engine, ask([noise(1)], max_tokens=MAX_MODEL_LEN - 8))


@pytest.mark.engine
async def test_transformers_batches_exactly_like_generate_alone(
    engine: Engine, vision_dir: Path
) -> None:
    """The image batcher's greedy outputs under load equal transformers' own `generate`
    for each request alone (padding and joining the running batch change nothing)."""
    if engine.info.engine != "transformers":
        pytest.skip("checks Ferry's own batching loop for image models")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor: Any = AutoProcessor.from_pretrained(vision_dir)
    model: Any = AutoModelForImageTextToText.from_pretrained(vision_dir).eval()
    requests = [ask([noise(200 + i)], "Tell me" + " more" * i, max_tokens=12) for i in range(5)]
    requests.append(
        GenerationRequest(
            uuid.uuid4().hex,
            messages=[{"role": "user", "content": "No picture this time."}],
            sampling=SamplingOptions(max_tokens=12, temperature=0),
        )
    )

    async def staggered(i: int, request: GenerationRequest) -> list[Delta]:
        await asyncio.sleep(0.02 * i)  # arrive while the others are decoding
        return await collect(engine, request)

    batched = await asyncio.gather(*(staggered(i, r) for i, r in enumerate(requests)))
    for request, deltas in zip(requests, batched, strict=True):
        text = processor.apply_chat_template(request.messages, add_generation_prompt=True)
        images = [list(request.images)] if request.images else None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected = processor.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        assert text_of(deltas) == expected


# --- end to end ------------------------------------------------------------------------


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_job(model: str, image: Image.Image, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
        **extra,
    }


def test_models_list_says_the_vision_model_takes_images(stack: Stack, vision_model: str) -> None:
    with stack.client() as client:
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[vision_model]["supports_images"] is True
    assert cards[vision_model]["workers"] >= 1


def test_image_job_answer_depends_on_the_image(stack: Stack, vision_model: str) -> None:
    with stack.client() as client:
        jobs = [
            submit(client, image_job(vision_model, img))
            for img in (noise(11), noise(12), noise(11))
        ]
        finals = [wait_job(client, job["id"]) for job in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals
    texts = [f["result"]["text"] for f in finals]
    assert texts[0] and texts[0] != texts[1]
    assert texts[0] == texts[2]  # same image, same greedy answer
    # The prompt's tokens include the image's.
    assert finals[0]["usage"]["prompt_tokens"] > TOKENS_PER_IMAGE


def test_completion_prompt_with_an_image_tag(stack: Stack, vision_model: str) -> None:
    """A completion prompt's Qwen-VL `<img>` tag becomes an image part; the worker puts the
    model's image placeholder there, and the image's tokens count in the prompt."""
    with stack.client() as client:
        plain = client.post(
            "/v1/completions",
            json={"model": vision_model, "prompt": "Look: ", "max_tokens": 8, "temperature": 0},
        )
        tagged = client.post(
            "/v1/completions",
            json={
                "model": vision_model,
                "prompt": f"Look: <img>{data_url(noise(14))}</img>",
                "max_tokens": 8,
                "temperature": 0,
            },
        )
    assert plain.status_code == 200, plain.text
    assert tagged.status_code == 200, tagged.text
    assert tagged.json()["usage"]["prompt_tokens"] == (
        plain.json()["usage"]["prompt_tokens"] + TOKENS_PER_IMAGE
    )


@pytest.fixture
def pg(stack: Stack) -> Iterator[psycopg.Connection[Any]]:
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def test_job_whose_image_is_gone_fails_clearly(
    stack: Stack, vision_model: str, pg: psycopg.Connection[Any]
) -> None:
    """A stored job that refers to an object the store no longer has fails with an error
    naming the image; the worker goes on serving."""
    with stack.client() as client:
        template = wait_job(client, submit(client, image_job(vision_model, noise(13)))["id"])
        row = pg.execute(
            "SELECT owner_id, request FROM jobs WHERE id = %s", (template["id"],)
        ).fetchone()
        assert row is not None
        owner_id, stored = row
        missing = "0" * 64
        for message in stored["messages"]:
            for part in message["content"]:
                if part.get("type") == "image":
                    part["image"]["sha256"] = missing
        # Inserted as a job whose Celery message was lost: the reconciler sends it.
        job_id = new_job_id()
        pg.execute(
            "INSERT INTO jobs (id, owner_id, model, kind, lane, status, priority, request, "
            "attempts, created_at) VALUES (%s, %s, %s, 'chat', 'interactive', 'queued', 0, "
            "%s, 0, now() - interval '1 minute')",
            (job_id, owner_id, vision_model, json.dumps(stored)),
        )
        final = wait_job(client, job_id, timeout=120)
        assert final["status"] == "failed", final
        assert missing in final["error"]["message"] and "missing" in final["error"]["message"]
        after = wait_job(client, submit(client, image_job(vision_model, noise(13)))["id"])
    assert after["status"] == "succeeded"
    assert after["result"]["text"] == template["result"]["text"]
