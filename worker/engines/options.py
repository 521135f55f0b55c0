"""vLLM's own worker flags (`ferry worker --dtype ... --lora-modules ...`): the checks made
before an engine starts, and what they become for each engine.

Everything here fails with `StartupError`, whose message is the reason the worker exits
with: a bad flag must stop the worker at start, never fail a user's request later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import StartupError
from worker.settings import WorkerSettings

# vLLM's allowed `max_lora_rank` values (vllm.config.lora.MaxLoRARanks).
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# AsyncEngineArgs keywords that have a flag (or a Ferry setting) of their own: the JSON
# passthrough may not set them, so each value has one place.
_OWN_FLAGS = {
    "model": "--model",
    "served_model_name": "--served-model-name",
    "max_model_len": "--max-model-len",
    "dtype": "--dtype",
    "trust_remote_code": "--trust-remote-code",
    "tensor_parallel_size": "--tensor-parallel-size",
    "quantization": "--quantization",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "limit_mm_per_prompt": "--limit-mm-per-prompt",
    "enable_lora": "--lora-modules",
    "max_lora_rank": "--max-lora-rank",
    "max_num_seqs": "--concurrency",
    "reasoning_parser": "--reasoning-parser",
    "scheduling_policy": "(Ferry schedules by priority)",
}

# Config fields whose values must agree between a model and the base an adapter was
# trained on: a different base of the same family differs in one of them.
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A checked `--lora-modules` entry."""

    name: str
    path: str
    rank: int
    # vLLM's LoRARequest id: positive, unique per engine.
    int_id: int
    target_modules: tuple[str, ...] = ()


def lora_adapters(settings: WorkerSettings, model_path: str) -> list[LoraAdapter]:
    """Check every adapter on disk (exists, is a peft LoRA adapter, of this base model as far
    as the files tell); the engine's warm-up then runs each once."""
    adapters: list[LoraAdapter] = []
    seen = {settings.model_name}
    for i, module in enumerate(settings.lora_modules, start=1):
        where = f"LoRA adapter {module.name!r} ({module.path})"
        if module.name in seen:
            raise StartupError(
                f"{where}: the name {module.name!r} is already served by this "
                "worker; give each adapter its own name"
            )
        seen.add(module.name)
        path = Path(module.path).expanduser()
        if not path.exists():
            raise StartupError(f"{where}: the path does not exist")
        config_path = path / "adapter_config.json"
        if not path.is_dir() or not config_path.is_file():
            raise StartupError(f"{where}: not a peft adapter (no adapter_config.json)")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise StartupError(f"{where}: adapter_config.json cannot be read: {exc}") from exc
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            kind = config.get("peft_type") if isinstance(config, dict) else None
            raise StartupError(f"{where}: not a LoRA adapter (peft_type {kind!r})")
        if not any(
            (path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")
        ):
            raise StartupError(f"{where}: no adapter weights (adapter_model.safetensors)")
        _check_base(where, config, model_path)
        _check_shapes(where, path, Path(model_path))
        targets = config.get("target_modules") or ()
        adapters.append(
            LoraAdapter(
                name=module.name,
                path=str(path.resolve()),
                rank=int(config.get("r") or 8),
                int_id=i,
                target_modules=tuple(targets) if isinstance(targets, list) else (),
            )
        )
    return adapters


def _read_config(directory: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _check_base(where: str, adapter_config: dict[str, Any], model_path: str) -> None:
    """An adapter names the model it was trained on (`base_model_name_or_path`). Where both
    that and the served model are directories here, their shapes must agree; anything else
    (a hub id) is left to the warm-up run, which fails on a shape mismatch."""
    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return
    ours, theirs = _read_config(Path(model_path)), _read_config(Path(base).expanduser())
    if ours is None or theirs is None:
        return
    for key in _SHAPE_FIELDS:
        if key in ours and key in theirs and ours[key] != theirs[key]:
            raise StartupError(
                f"{where}: trained on another base model ({base}: {key} {theirs[key]}, "
                f"the served model's {key} is {ours[key]})"
            )


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _check_shapes(where: str, adapter_dir: Path, model_dir: Path) -> None:
    """Each adapted layer's A (rank x in) and B (out x rank) must fit the served model's
    weight of that layer (out x in): vLLM's engine core dies on a mismatch, so it is caught
    here where both sets of files are at hand."""
    adapter_file = adapter_dir / "adapter_model.safetensors"
    model_files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not adapter_file.is_file() or not model_files:
        return
    try:
        adapter, model = _tensor_shapes([adapter_file]), _tensor_shapes(model_files)
    except Exception as exc:
        raise StartupError(f"{where}: the weights cannot be read: {exc}") from exc
    for key, shape in adapter.items():
        for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part):
                continue
            layer = key.removeprefix("base_model.model.").removesuffix(part)
            weight = model.get(f"{layer}.weight")
            if weight is not None and len(shape) == 2 and shape[axis] != weight[axis]:
                raise StartupError(
                    f"{where}: does not fit the served model ({layer}: the adapter's "
                    f"{part[1:7]} is {list(shape)}, the model's weight is {list(weight)}); "
                    "it was trained on another base model"
                )


def check_lora_rank(settings: WorkerSettings, adapters: list[LoraAdapter]) -> None:
    """No adapter may have a rank over `--max-lora-rank` (on either engine, as vLLM)."""
    if settings.max_lora_rank is None or not adapters:
        return
    worst = max(adapters, key=lambda a: a.rank)
    if worst.rank > settings.max_lora_rank:
        raise StartupError(
            f"LoRA adapter {worst.name!r} has rank {worst.rank}, over "
            f"--max-lora-rank {settings.max_lora_rank}"
        )


def max_lora_rank(settings: WorkerSettings, adapters: list[LoraAdapter]) -> int:
    """`--max-lora-rank`, else the largest adapter rank rounded up to a rank vLLM allows."""
    check_lora_rank(settings, adapters)
    if settings.max_lora_rank is not None:
        return settings.max_lora_rank
    largest = max(a.rank for a in adapters)
    for rank in _LORA_RANKS:
        if rank >= largest:
            return rank
    raise StartupError(f"LoRA rank {largest} is over vLLM's largest ({_LORA_RANKS[-1]})")


def check_engine_args(extra: dict[str, Any], known: set[str]) -> None:
    """The JSON passthrough (`--engine-args`, FERRY_ENGINE_ARGS) may name only
    AsyncEngineArgs keywords that have no flag of their own."""
    unknown = sorted(set(extra) - known)
    if unknown:
        raise StartupError(
            f"--engine-args: {', '.join(unknown)} not an AsyncEngineArgs "
            "keyword of the installed vLLM"
        )
    for key in sorted(extra):
        if key in _OWN_FLAGS:
            raise StartupError(f"--engine-args: {key} has its own setting: use {_OWN_FLAGS[key]}")


def vllm_flag_args(
    settings: WorkerSettings, adapters: list[LoraAdapter], known: set[str]
) -> dict[str, Any]:
    """The AsyncEngineArgs keywords vLLM's flags and the passthrough become."""
    s = settings
    check_engine_args(s.engine_args, known)
    args: dict[str, Any] = {
        "dtype": s.dtype,
        "trust_remote_code": s.trust_remote_code,
        "tensor_parallel_size": s.tensor_parallel_size,
    }
    if s.quantization is not None:
        args["quantization"] = s.quantization
    if s.limit_mm_per_prompt is not None:
        args["limit_mm_per_prompt"] = s.limit_mm_per_prompt
    if adapters:
        # Every adapter can be in one batch, beside base-model requests (vLLM's default).
        args.update(
            enable_lora=True, max_loras=len(adapters), max_lora_rank=max_lora_rank(s, adapters)
        )
    return {**args, **s.engine_args}


def check_transformers_options(settings: WorkerSettings) -> None:
    """The transformers engine honours dtype, trust_remote_code, max_model_len,
    limit_mm_per_prompt and lora_modules (checked by `lora_adapters`, as for vLLM); it
    refuses the flags it cannot honour rather than ignore them."""
    s = settings
    if s.tensor_parallel_size > 1:
        raise StartupError(
            f"--tensor-parallel-size {s.tensor_parallel_size}: the transformers "
            "engine runs a model on one device; use --engine vllm"
        )
    if s.quantization is not None:
        raise StartupError(
            f"--quantization {s.quantization}: the transformers engine loads "
            "the weights as stored; use --engine vllm"
        )
    if s.engine_args:
        raise StartupError(
            f"--engine-args ({', '.join(sorted(s.engine_args))}): these are "
            "vLLM AsyncEngineArgs; the transformers engine takes none"
        )


def torch_dtype(settings: WorkerSettings) -> Any:
    """`--dtype` as transformers' from_pretrained takes it (vLLM's names)."""
    import torch

    names: dict[str, Any] = {
        "auto": "auto",
        "half": torch.float16,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float": torch.float32,
        "float32": torch.float32,
    }
    if settings.dtype not in names:
        raise StartupError(f"--dtype {settings.dtype}: not one of {', '.join(names)}")
    return names[settings.dtype]


def check_parsers(settings: WorkerSettings) -> None:
    """`--reasoning-parser` / `--tool-call-parser` must name a parser of vLLM's own
    registries (the API splits output with them)."""
    if settings.reasoning_parser is None and settings.tool_call_parser is None:
        return
    try:
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager
    except ImportError as exc:
        raise StartupError(
            f"--reasoning-parser / --tool-call-parser need vLLM's parsers, "
            f"and vLLM cannot be imported: {exc}"
        ) from exc
    checks = (
        (settings.reasoning_parser, "--reasoning-parser", ReasoningParserManager.list_registered()),
        (settings.tool_call_parser, "--tool-call-parser", ToolParserManager.list_registered()),
    )
    for name, flag, known in checks:
        if name is not None and name not in known:
            raise StartupError(
                f"{flag} {name}: not one of vLLM's parsers ({', '.join(sorted(known))})"
            )


def remote_code_hint(exc: BaseException, settings: WorkerSettings) -> StartupError | None:
    """A model load that failed because the model needs its own code: say which flag."""
    text = str(exc)
    if settings.trust_remote_code or "trust_remote_code" not in text:
        return None
    return StartupError(
        f"{settings.model} needs its own code to load: start the worker with "
        f"--trust-remote-code (FERRY_TRUST_REMOTE_CODE=true) if you trust it "
        f"({text.strip().splitlines()[0]})"
    )
