"""Models Ferry builds itself: the tiny random-weight models (`tiny`) and SmolLM2-135M-Instruct
from its package on the registry (`smollm2`), each into the model cache on first use
(`cache`).

Names are imported lazily so that `python -m worker.models.tiny` does not import the
module twice (runpy warns when the package already imported it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.models.tiny import TINY_MODELS, ensure_tiny_model, is_tiny_model

__all__ = ["TINY_MODELS", "ensure_model", "ensure_tiny_model", "is_built_model", "is_tiny_model"]


def is_built_model(name: str) -> bool:
    """Is `name` a model Ferry builds itself (rather than a hub id or a directory)?"""
    from worker.models import smollm2, tiny

    return tiny.is_tiny_model(name) or smollm2.is_smollm2(name)


def ensure_model(name: str, cache_dir: Path) -> Path:
    """The directory of a model Ferry builds itself, built into `cache_dir` on first use
    (raises `worker.errors.ModelBuildError` with the reason when it cannot be built)."""
    from worker.models import smollm2, tiny

    if smollm2.is_smollm2(name):
        return smollm2.ensure_smollm2(cache_dir)
    return tiny.ensure_tiny_model(name, cache_dir)


def __getattr__(name: str) -> Any:
    if name in ("TINY_MODELS", "ensure_tiny_model", "is_tiny_model"):
        from worker.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
