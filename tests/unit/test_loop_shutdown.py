"""close_at_loop_shutdown: a resource opened on an event loop is closed by that loop's shutdown."""

from __future__ import annotations

import asyncio
import gc
import sys
import warnings

from flexguard_integrations.transport.base import close_at_loop_shutdown


class Resource:
    def __init__(self) -> None:
        self.closes = 0

    async def aclose(self) -> None:
        await asyncio.sleep(0)  # a real close awaits I/O: the loop must still be running
        self.closes += 1


def test_asyncio_run_closes_it_while_the_loop_still_runs() -> None:
    res = Resource()
    keepers = []

    async def main() -> None:
        keepers.append(close_at_loop_shutdown(res.aclose))

    asyncio.run(main())
    assert res.closes == 1


def test_an_early_aclose_closes_once() -> None:
    res = Resource()

    async def main() -> None:
        keeper = close_at_loop_shutdown(res.aclose)
        await keeper.aclose()
        await keeper.aclose()

    asyncio.run(main())
    assert res.closes == 1


def test_dropped_while_the_loop_runs_it_is_closed_by_a_task() -> None:
    res = Resource()

    async def main() -> None:
        keeper = close_at_loop_shutdown(res.aclose)
        del keeper
        gc.collect()
        for _ in range(100):  # asyncio runs the close in a task it schedules
            if res.closes:
                break
            await asyncio.sleep(0)

    asyncio.run(main())
    assert res.closes == 1


def test_a_loop_closed_without_shutdown_runs_nothing_and_warns_nothing() -> None:
    res = Resource()
    loop = asyncio.new_event_loop()
    keepers = []

    async def main() -> None:
        keepers.append(close_at_loop_shutdown(res.aclose))

    loop.run_until_complete(main())
    loop.close()  # no shutdown_asyncgens()
    unraisable: list[object] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keepers.clear()
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert res.closes == 0
    assert [str(w.message) for w in caught] == []
    assert unraisable == []  # no "Exception ignored in" from the finalizer either
