"""The worker's engine admission gate (worker/admission.py), on a real event loop: bulk jobs
beyond the limit wait in arrival order and enter as slots free; an interactive job narrows
the limit until its cooldown ends; a cancelled or stopping waiter stops waiting."""

from __future__ import annotations

import asyncio

import pytest

from worker.admission import EngineAdmission
from worker.errors import WorkerStopping


def gate(slots: int = 4, cooldown: float = 0.2) -> EngineAdmission:
    """All slots for bulk while idle, a quarter (at least one) while interactive work runs,
    as WorkerSettings(bulk_share=1.0, bulk_share_busy=0.25) would give."""
    return EngineAdmission(
        idle_limit=slots, busy_limit=max(1, slots // 4), cooldown_seconds=cooldown
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_bulk_jobs_wait_for_a_slot_and_enter_in_arrival_order() -> None:
    admission = gate(slots=2)
    entered: list[int] = []
    release = {i: asyncio.Event() for i in range(5)}

    async def job(i: int) -> None:
        async with admission.bulk(lambda: False) as admitted:
            assert admitted
            entered.append(i)
            await release[i].wait()

    tasks = [asyncio.create_task(job(i)) for i in range(5)]
    await settle()
    assert entered == [0, 1] and admission.bulk_in_engine == 2
    release[1].set()
    await settle()
    assert entered == [0, 1, 2] and admission.bulk_in_engine == 2
    release[0].set()
    release[2].set()
    await settle()
    assert entered == [0, 1, 2, 3, 4]
    release[3].set()
    release[4].set()
    await asyncio.gather(*tasks)
    assert admission.bulk_in_engine == 0


async def test_an_interactive_job_narrows_bulk_until_its_cooldown_ends() -> None:
    admission = gate(slots=4, cooldown=0.2)
    assert admission.bulk_limit == 4
    entered: list[int] = []
    hold = asyncio.Event()

    async def job(i: int) -> None:
        async with admission.bulk(lambda: False):
            entered.append(i)
            await hold.wait()

    async with admission.interactive():
        assert admission.bulk_limit == 1
        tasks = [asyncio.create_task(job(i)) for i in range(3)]
        await settle()
        assert entered == [0]  # the rest wait while interactive work runs
    await settle()
    assert entered == [0]  # ... and through the cooldown
    assert admission.bulk_limit == 1
    await asyncio.sleep(0.35)
    assert admission.bulk_limit == 4
    assert entered == [0, 1, 2]  # woken when the cooldown ended
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_gives_up_without_a_slot() -> None:
    admission = gate(slots=1)
    cancelled = False
    hold = asyncio.Event()
    outcomes: list[bool] = []

    async def running() -> None:
        async with admission.bulk(lambda: False):
            await hold.wait()

    async def waiting() -> None:
        async with admission.bulk(lambda: cancelled) as admitted:
            outcomes.append(admitted)

    first = asyncio.create_task(running())
    second = asyncio.create_task(waiting())
    await settle()
    assert outcomes == []
    cancelled = True
    admission.wake()
    await asyncio.wait_for(second, 1)
    assert outcomes == [False] and admission.bulk_in_engine == 1
    hold.set()
    await first
    assert admission.bulk_in_engine == 0


async def test_waiters_give_up_when_the_worker_stops() -> None:
    admission = gate(slots=1)
    hold = asyncio.Event()

    async def running() -> None:
        async with admission.bulk(lambda: False):
            await hold.wait()

    async def waiting() -> None:
        async with admission.bulk(lambda: False):
            pytest.fail("admitted after close")

    first = asyncio.create_task(running())
    second = asyncio.create_task(waiting())
    await settle()
    admission.close()
    with pytest.raises(WorkerStopping):
        await asyncio.wait_for(second, 1)
    hold.set()
    await first
