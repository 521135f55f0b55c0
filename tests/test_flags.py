"""`ferry worker` takes vLLM's own flags: they reach the settings, and a flag the engine
cannot honour (or a bad value) stops the worker at start with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cli.main import _worker_settings, build_parser
from ferry_testing.procs import ROOT
from storage.registry import ServedModel, WorkerBeat
from tests.conftest import TINY
from tests.lora import build_lora_adapter
from tests.remote_code import build_remote_code_model
from worker.engines.base import GenerationRequest, SamplingOptions
from worker.errors import StartupError
from worker.models import ensure_tiny_model
from worker.settings import LoraModule, WorkerSettings


@pytest.fixture(scope="module")
def tiny_dir(model_cache: Path) -> Path:
    return ensure_tiny_model(TINY, model_cache)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_dir, tmp_path_factory.mktemp("lora") / "tiny-a")


def test_vllm_flags_become_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The flags alone (no FERRY_ variables of the test run), restored after the test.
    monkeypatch.setattr(
        os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    )
    args = build_parser().parse_args(
        [
            "worker",
            "Org/Model",
            "--max-model-len",
            "4096",
            "--served-model-name",
            "m",
            "--dtype",
            "float32",
            "--trust-remote-code",
            "--tensor-parallel-size",
            "2",
            "--quantization",
            "awq",
            "--gpu-memory-utilization",
            "0.5",
            "--limit-mm-per-prompt",
            '{"image": 2}',
            "--lora-modules",
            "fr=/a/fr",
            '{"name": "de", "path": "/a/de", "base_model_name": "m"}',
            "--max-lora-rank",
            "16",
            "--reasoning-parser",
            "deepseek_r1",
            "--tool-call-parser",
            "hermes",
            "--engine-args",
            '{"max_num_batched_tokens": 4096}',
        ]
    )
    s = _worker_settings(args)
    assert "FERRY_MODEL" not in os.environ  # the CLI leaves the environment alone
    assert (s.model, s.model_name, s.max_model_len, s.dtype) == ("Org/Model", "m", 4096, "float32")
    assert (s.trust_remote_code, s.tensor_parallel_size, s.quantization) == (True, 2, "awq")
    assert s.gpu_memory_utilization == 0.5
    assert s.limit_mm_per_prompt == {"image": 2}
    assert s.lora_modules == [
        LoraModule(name="fr", path="/a/fr"),
        LoraModule(name="de", path="/a/de", base_model_name="m"),
    ]
    assert (s.max_lora_rank, s.reasoning_parser, s.tool_call_parser) == (
        16,
        "deepseek_r1",
        "hermes",
    )
    assert s.engine_args == {"max_num_batched_tokens": 4096}
    # The flags win over FERRY_ variables, which give the rest.
    monkeypatch.setenv("FERRY_MAX_MODEL_LEN", "8")
    monkeypatch.setenv("FERRY_CONCURRENCY", "3")
    s = _worker_settings(args)
    assert (s.max_model_len, s.concurrency) == (4096, 3)
    # The env var also takes vLLM's plain form.
    monkeypatch.setenv("FERRY_LORA_MODULES", "a=/x, b=/y")
    assert [m.name for m in WorkerSettings().lora_modules] == ["a", "b"]


def test_registry_entries_load_across_versions() -> None:
    """Old JSON (no new fields) loads; fields a newer process adds are ignored."""
    old = ServedModel.from_json('{"name": "m", "max_model_len": 8, "engine": "vllm"}')
    assert (old.base_model, old.reasoning_parser, old.tool_call_parser) == (None, None, None)
    newer = json.dumps(
        {
            "name": "a",
            "max_model_len": 8,
            "engine": "vllm",
            "base_model": "m",
            "tool_call_parser": "hermes",
            "from_the_future": 1,
        }
    )
    assert ServedModel.from_json(newer).base_model == "m"
    beat = WorkerBeat("w", "m", "vllm", 0, 0.0, adapters=("a",))
    assert beat.serves("m") and beat.serves("a") and not beat.serves("b")


def _worker_exit(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return done.returncode, done.stderr


@pytest.mark.e2e
def test_bad_lora_modules_stop_the_worker_with_the_reason(
    tmp_path: Path, tiny_adapter: Path, model_cache: Path
) -> None:
    rc, err = _worker_exit(["--model", TINY, "--lora-modules", f"fr={tmp_path / 'missing'}"])
    assert rc == 2 and "LoRA adapter 'fr'" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, err = _worker_exit(["--model", TINY, "--lora-modules", f"fr={tmp_path / 'empty'}"])
    assert rc == 2 and "not a peft adapter" in err
    rc, err = _worker_exit(["--model", TINY, "--lora-modules", "fr"])
    assert rc == 2 and "not name=path" in err
    # An adapter of the tiny chat model, for the (differently shaped) tiny vision model.
    vision = ensure_tiny_model("ferry-tiny-vision", model_cache)
    rc, err = _worker_exit(["--model", str(vision), "--lora-modules", f"fr={tiny_adapter}"])
    assert rc == 2 and "trained on another base model" in err, err


@pytest.mark.e2e
async def test_transformers_engine_refuses_what_it_cannot_honour(tiny_dir: Path) -> None:
    from worker.engines.transformers import TransformersEngine

    cases = [
        ({"tensor_parallel_size": 2}, "--tensor-parallel-size 2"),
        ({"quantization": "awq"}, "--quantization awq"),
        ({"engine_args": {"max_num_batched_tokens": 64}}, "max_num_batched_tokens"),
        # It runs adapters (tests/test_lora.py), checked as vLLM's are.
        ({"lora_modules": "fr=/x"}, r"LoRA adapter 'fr' \(/x\): the path does not exist"),
        ({"reasoning_parser": "no_such_parser"}, "--reasoning-parser no_such_parser"),
    ]
    for values, reason in cases:
        settings = WorkerSettings(model=str(tiny_dir), **values)  # type: ignore[arg-type]
        with pytest.raises(StartupError, match=reason):
            await TransformersEngine(tiny_dir, settings).start()
    # A dtype neither engine knows is refused by the settings themselves, naming it.
    with pytest.raises(ValidationError, match="dtype"):
        WorkerSettings(model=str(tiny_dir), dtype="int3")  # type: ignore[arg-type]


async def _answer(engine: object, prompt: str) -> str:
    request = GenerationRequest(
        "r", prompt=prompt, sampling=SamplingOptions(max_tokens=4, temperature=0)
    )
    return "".join([d.text async for d in engine.generate(request)])  # type: ignore[attr-defined]


@pytest.mark.e2e
async def test_a_model_with_its_own_code_needs_trust_remote_code(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """transformers engine: refused with the flag to use, then loaded with it (dtype too)."""
    from worker.engines.transformers import TransformersEngine

    remote = build_remote_code_model(tiny_dir, tmp_path / "remote")
    settings = WorkerSettings(model=str(remote), concurrency=2)
    with pytest.raises(StartupError, match="--trust-remote-code"):
        await TransformersEngine(remote, settings).start()
    settings = WorkerSettings(
        model=str(remote), concurrency=2, trust_remote_code=True, dtype="bfloat16", max_model_len=64
    )
    engine = TransformersEngine(remote, settings)
    await engine.start()
    try:
        assert engine.info.max_model_len == 64
        assert await _answer(engine, "Hello")
    finally:
        await engine.stop()


@pytest.mark.e2e
def test_vllm_refuses_remote_code_unknown_engine_args_and_parsers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """The vLLM engine's start-up checks, each before an engine core is started; then the
    model with its own code loads with --trust-remote-code."""
    remote = build_remote_code_model(tiny_dir, tmp_path / "remote")
    script = f"""
import asyncio
from worker.engines.base import GenerationRequest, SamplingOptions
from worker.engines.vllm import VllmEngine
from worker.errors import StartupError
from worker.settings import WorkerSettings

async def main():
    cases = [
        ({str(remote)!r}, {{}}),
        ({str(tiny_dir)!r}, {{"engine_args": {{"no_such_arg": 1}}}}),
        ({str(tiny_dir)!r}, {{"engine_args": {{"dtype": "half"}}}}),
        ({str(tiny_dir)!r}, {{"reasoning_parser": "no_such_parser"}}),
        ({str(tiny_dir)!r}, {{"tool_call_parser": "no_such_parser"}}),
    ]
    for model, values in cases:
        try:
            await VllmEngine(model, WorkerSettings(model=model, **values)).start()
            print("STARTED")
        except StartupError as exc:
            print("REFUSED", exc)
    engine = VllmEngine({str(remote)!r}, WorkerSettings(model={str(remote)!r},
                                                        trust_remote_code=True, concurrency=2))
    await engine.start()
    request = GenerationRequest("r", prompt="Hello", sampling=SamplingOptions(max_tokens=4,
                                                                           temperature=0))
    print("LOADED", repr("".join([d.text async for d in engine.generate(request)])))
    await engine.stop()

if __name__ == "__main__":
    asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(("REFUSED", "START"))]
    assert len(lines) == 5, done.stdout + done.stderr
    assert all(line.startswith("REFUSED") for line in lines), lines
    assert "--trust-remote-code" in lines[0]
    assert "no_such_arg not an AsyncEngineArgs keyword" in lines[1]
    assert "dtype has its own setting: use --dtype" in lines[2]
    assert "--reasoning-parser no_such_parser: not one of vLLM's parsers" in lines[3]
    assert "deepseek_r1" in lines[3]
    assert "--tool-call-parser no_such_parser" in lines[4] and "hermes" in lines[4]
    loaded = [line for line in done.stdout.splitlines() if line.startswith("LOADED")]
    assert loaded and loaded[0] != "LOADED ''", done.stdout + done.stderr


def test_parsers_vllm_knows_are_accepted() -> None:
    from worker.engines.options import check_parsers

    asyncio.run(
        asyncio.to_thread(
            check_parsers, WorkerSettings(reasoning_parser="deepseek_r1", tool_call_parser="hermes")
        )
    )
