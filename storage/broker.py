"""Celery settings shared by the producer (API) and the consumers (workers)."""

from __future__ import annotations

from typing import Any

# Redis has no native priorities: kombu keeps one list per step; 0 is served first.
PRIORITY_STEPS = list(range(10))
_SEP = ":"


def priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue, one per priority step."""
    return [f"{queue}{_SEP}{step}" if step else queue for step in PRIORITY_STEPS]


def broker_transport_options() -> dict[str, Any]:
    return {
        "priority_steps": PRIORITY_STEPS,
        "sep": _SEP,
        # A worker listens to `<model>.interactive,<model>.bulk` in that order and takes
        # from the first non-empty one, so interactive jobs never wait behind bulk ones.
        "queue_order_strategy": "priority",
        # Unacked messages come back after this long; the reconciler is much faster.
        "visibility_timeout": 3600,
    }


def celery_conf() -> dict[str, Any]:
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # One message per free thread: the rest stay on the broker for other workers.
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(),
    }


def celery_priority(priority: int) -> int:
    """Job priority (lower first, like vLLM) clamped to the broker's 0..9 steps."""
    return max(0, min(9, priority))
