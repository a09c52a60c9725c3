"""One wait helper for the suites: poll a condition in the event loop (the servers under test
keep running in it) until it holds, or fail saying what did not happen.

Timeouts are generous on purpose: six suites share two cores, and a test waits on an event,
never on a sleep of a guessed length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "", *,
                poll: float = 0.05) -> Any:
    """Wait until `predicate()` (or the awaitable it returns) is truthy; return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await _value(predicate())):
        assert loop.time() < deadline, f"not reached within {timeout:g} s: {what or 'condition'}"
        await asyncio.sleep(poll)
    return value


async def _value(v: Any) -> Any:
    return await v if isinstance(v, Awaitable) else v


async def first(timeout: float, **waits: Awaitable[Any]) -> tuple[str, Any]:
    """The name and result of whichever of `waits` finishes first without an error (the others
    are cancelled); fails naming every one that did not, when none did within `timeout`."""
    tasks = {asyncio.ensure_future(w): name for name, w in waits.items()}
    done, pending = await asyncio.wait(tasks, timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is None:
            return tasks[t], t.result()
    raise AssertionError(f"none of {', '.join(waits)} within {timeout:g} s" + "".join(
        f"; {tasks[t]}: {t.exception()}" for t in done))
