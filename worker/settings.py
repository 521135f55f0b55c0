"""Worker settings, read once from the environment (FERRY_ prefix), or given by `ferry worker`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "ferry-tiny-chat"


class LoraModule(BaseModel):
    """One `--lora-modules` entry: vLLM's `name=path`, or its JSON form."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    base_model_name: str | None = None


def parse_lora_module(spec: Any) -> LoraModule:
    """vLLM's syntax: `name=path`, or a JSON object `{"name", "path", "base_model_name"}`
    (as a string or already decoded)."""
    if isinstance(spec, LoraModule):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            spec = json.loads(text)
        else:
            name, sep, path = text.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"LoRA module {spec!r} is not name=path or a JSON object")
            return LoraModule(name=name.strip(), path=path.strip())
    return LoraModule.model_validate(spec)


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # A hub id, a local directory, or a model Ferry builds itself: a tiny one
    # (worker/models/tiny.py) or SmolLM2-135M-Instruct (worker/models/smollm2.py).
    model: str = DEFAULT_MODEL
    # Name under which the model is served; defaults to `model`.
    served_model_name: str | None = None
    engine: Literal["vllm", "transformers"] = "vllm"
    # Where the models Ferry builds itself are built and cached.
    model_cache_dir: Path = Path.home() / ".cache" / "ferry" / "models"
    # Jobs inside the one engine at once (vLLM's max_num_seqs).
    concurrency: int = 64
    # Batch lines claimed and waiting at the worker to enter the engine, so a line that
    # ends is replaced at once (worker/admission.py). Lines of one batch end in waves, and
    # a backlog smaller than a wave leaves slots empty meanwhile (bench/README.md).
    bulk_backlog: int = Field(96, ge=0)
    # Share of the engine's slots batch lines may fill while this worker has no
    # interactive job, and while it has one (or had one in the last cooldown seconds).
    bulk_share: float = Field(1.0, gt=0.0, le=1.0)
    bulk_share_busy: float = Field(0.03, gt=0.0, le=1.0)
    interactive_cooldown_seconds: float = Field(5.0, ge=0)
    # Context (prompt + completion) in tokens. None: the model's own (its config's
    # max_position_embeddings, as vLLM derives it); a number caps it.
    max_model_len: int | None = Field(None, ge=1)
    # Weights' and activations' dtype, vLLM's names. "auto": the model config's, except
    # on CPU with vLLM (worker/engines/common.py `engine_dtype`).
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    # Structured outputs (response_format): allow free whitespace between JSON tokens?
    # Off by default (compact JSON, as OpenAI answers): weak models otherwise tend to emit
    # whitespace until max_tokens.
    structured_output_any_whitespace: bool = False
    # vLLM CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPU.
    cpu_kv_cache_gib: int = 1
    # CPU threads the engine computes with on a machine without a GPU (transformers' torch
    # ops; vLLM's engine core process). None: OMP_NUM_THREADS if set, else every core for
    # vLLM and all cores but one for transformers (worker/engines/common.py cpu_threads).
    torch_threads: int | None = None
    gpu_memory_utilization: float = 0.9
    # A claimed job is ours while the lease lives; renewed every lease/3 seconds.
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    # Bulk (batch) jobs get this engine priority; interactive jobs get 0.
    bulk_priority: int = 10
    # A job whose workers died this many times is failed instead of run again.
    max_attempts: int = 3

    # vLLM's own flags (`ferry worker --trust-remote-code ...`), passed to the engine; the
    # transformers engine honours those that apply and refuses the others at start.
    trust_remote_code: bool = False
    tensor_parallel_size: int = Field(1, ge=1)
    quantization: str | None = None
    # vLLM's JSON form, e.g. {"image": 2}.
    limit_mm_per_prompt: dict[str, Any] | None = None
    # LoRA adapters, each served as its own model id on this worker's engine. The env var
    # takes a JSON list (of `name=path` strings or objects) or `name=path` items split by
    # commas or spaces.
    lora_modules: Annotated[list[LoraModule], NoDecode] = []
    max_lora_rank: int | None = Field(None, ge=1)
    # vLLM's parsers by name (validated at start, announced to the API).
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    # Any other AsyncEngineArgs keyword, as JSON (FERRY_ENGINE_ARGS).
    engine_args: dict[str, Any] = {}

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_modules(cls, value: Any) -> list[LoraModule]:
        if value is None or value == "":
            return []
        if isinstance(value, str):
            text = value.strip()
            items: Any = (
                json.loads(text)
                if text.startswith("[")
                else ([text] if text.startswith("{") else text.replace(",", " ").split())
            )
        else:
            items = value
        return [parse_lora_module(item) for item in items]

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def bulk_slots(self) -> int:
        """Engine slots batch lines may fill (never fewer than one), with no interactive
        job around..."""
        return max(1, int(self.concurrency * self.bulk_share))

    @property
    def bulk_slots_busy(self) -> int:
        """...and while there is one."""
        return max(1, int(self.concurrency * self.bulk_share_busy))

    @property
    def bulk_window(self) -> int:
        """Batch lines this worker takes at once (in the engine or waiting at its gate)."""
        return self.bulk_slots + self.bulk_backlog

    @property
    def bulk_window_busy(self) -> int:
        return self.bulk_slots_busy + self.bulk_backlog

    @property
    def task_threads(self) -> int:
        """Celery task threads: batch lines hold at most `bulk_window` of them, so
        interactive jobs always find `concurrency` threads free (blocked threads are cheap;
        how many jobs are *in the engine* is the admission gate's and the engine's call)."""
        return self.concurrency + self.bulk_window


_settings: WorkerSettings | None = None


def get_worker_settings() -> WorkerSettings:
    """This process's settings: those `use_worker_settings` gave, else the environment's
    (read once)."""
    global _settings
    if _settings is None:
        _settings = WorkerSettings()
    return _settings


def use_worker_settings(settings: WorkerSettings) -> None:
    """Run this process's worker with these settings (`ferry worker`: its flags)."""
    global _settings
    _settings = settings
