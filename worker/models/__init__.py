"""Models Ferry can build offline (see `tiny`).

Names are imported lazily so that `python -m worker.models.tiny` does not import the
module twice (runpy warns when the package already imported it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.models.tiny import TINY_MODELS, ensure_tiny_model, is_tiny_model

__all__ = ["TINY_MODELS", "ensure_tiny_model", "is_tiny_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
