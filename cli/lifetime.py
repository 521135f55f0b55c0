"""Child processes that do not outlive their parent, even when it is SIGKILLed.

Linux's PR_SET_PDEATHSIG: a process asks the kernel for a signal when its parent goes,
however it goes (the OOM killer's SIGKILL included). The kernel counts the *thread* that
started the child as its parent, so children are started from a thread that lives as long
as they should. Elsewhere these are no-ops.

- `ferry serve` starts Redis and its workers with `die_with_parent` (docs/operations.md).
- `ferry worker` calls `children_die_with_this_process` before its engine starts: vLLM
  starts its engine core with multiprocessing (fork by default, spawn where CUDA is already
  initialised) and does not watch its own parent, so without this an engine core whose
  worker was killed lives on, holding the model's memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Set in a worker's environment for its children: the pid they are to die with.
_OWNER_VAR = "FERRY_WORKER_PID"


def _load_prctl() -> Callable[[int, int], int] | None:
    if sys.platform != "linux":
        return None
    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


# Looked up once here: a child between fork and exec must not load libraries.
_PRCTL = _load_prctl()


def _arm(sig: signal.Signals, parent: int) -> None:
    """In the child: `sig` when `parent` goes; if it went already, go now."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent went before the line above took effect
        os._exit(1)


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """For `subprocess.Popen(preexec_fn=...)`: the child gets `sig` when this process
    (the thread calling Popen) goes."""
    parent = os.getpid()
    return lambda: _arm(sig, parent)


def children_die_with_this_process() -> None:
    """The processes this one starts directly get SIGKILL when it goes: forked children
    through an at-fork hook, spawned ones (which import the main module as `__mp_main__`)
    through `arm_spawned_child`. Their own children are theirs to look after (vLLM's
    executor processes watch the engine core through a pipe)."""
    if _PRCTL is None:
        return
    os.environ[_OWNER_VAR] = str(os.getpid())
    os.register_at_fork(after_in_child=arm_spawned_child)


def arm_spawned_child() -> None:
    """In a child of a process that called `children_die_with_this_process`: die with it.
    The mark is taken out of the environment, so the child's own children are not armed
    against the wrong parent."""
    owner = os.environ.pop(_OWNER_VAR, None)
    if owner is not None and owner.isdigit():
        _arm(signal.SIGKILL, int(owner))
