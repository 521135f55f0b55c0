"""A stand-in for `ferry worker` and its engine core, for tests/test_supervision.py.

`python -m tests.lifetime_child armed|unarmed` starts one child with multiprocessing's
fork method and one with spawn (vLLM starts its engine core with one or the other), the
first from a thread that lives on as vLLM's loop thread does, prints their pids and waits.
Armed, it does what `ferry worker` does (cli/main.py): its children die with it.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time

from cli import lifetime

if __name__ == "__mp_main__":
    lifetime.arm_spawned_child()  # as cli/main.py does


def _sleep() -> None:
    time.sleep(600)


def main() -> None:
    if sys.argv[1] == "armed":
        lifetime.children_die_with_this_process()
    children: list[multiprocessing.Process] = []

    def start(method: str) -> None:
        child = multiprocessing.get_context(method).Process(target=_sleep, daemon=False)
        child.start()
        children.append(child)

    thread = threading.Thread(target=lambda: (start("fork"), time.sleep(600)), daemon=True)
    thread.start()
    start("spawn")
    while len(children) < 2:
        time.sleep(0.05)
    print(" ".join(str(c.pid) for c in children), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
