"""Engines: one interface (`base.Engine`), two implementations, one factory.

Engine modules import their heavy libraries (vllm, torch, transformers) lazily, inside
`start()`, so importing this package stays cheap for the API and the CLI.
"""

from __future__ import annotations

from pathlib import Path

from worker.engines.base import (
    Delta,
    Engine,
    GenerationRequest,
    ModelInfo,
    SamplingOptions,
)
from worker.settings import WorkerSettings

__all__ = [
    "Delta",
    "Engine",
    "GenerationRequest",
    "ModelInfo",
    "SamplingOptions",
    "build_engine",
    "resolve_model_path",
]


def resolve_model_path(settings: WorkerSettings) -> str:
    """The name of a model Ferry builds itself (a tiny one, SmolLM2-135M-Instruct) becomes
    its built directory (built on first use); anything else (a hub id or a local
    directory) is passed to the engine as is."""
    from worker.models import ensure_model, is_built_model

    if is_built_model(settings.model):
        return str(ensure_model(settings.model, Path(settings.model_cache_dir)))
    return settings.model


def build_engine(settings: WorkerSettings) -> Engine:
    """Construct (not start) the engine the settings ask for."""
    model_path = resolve_model_path(settings)
    if settings.engine == "vllm":
        from worker.engines.vllm import VllmEngine

        return VllmEngine(model_path, settings)
    if settings.engine == "transformers":
        from worker.engines.transformers import TransformersEngine

        return TransformersEngine(model_path, settings)
    raise ValueError(f"unknown engine {settings.engine!r}")
