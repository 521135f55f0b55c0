"""What the admin routes do beyond one query: merging a PATCH into the stored limits."""

from __future__ import annotations

from typing import Any

from api.core.limits import KeyLimits, stored_limits


def merged_limits(stored: dict[str, Any] | None, patch: KeyLimits) -> dict[str, Any]:
    """The stored limits with each field the PATCH gave replaced; a `null` clears one."""
    merged = stored_limits(stored).model_dump(exclude_none=True)
    for field in patch.model_fields_set:
        value = getattr(patch, field)
        if value is None:
            merged.pop(field, None)
        else:
            merged[field] = value
    return merged


def limits_to_store(limits: KeyLimits) -> dict[str, Any]:
    """Only the fields set: an unset field follows the deployment's default, even if that
    default changes later."""
    return limits.model_dump(exclude_none=True)
