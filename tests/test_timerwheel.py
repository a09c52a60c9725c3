"""The timer wheel: many deadlines behind one loop timer (edgeproxy.timerwheel, issue 11)."""

from __future__ import annotations

import asyncio

from edgeproxy.timerwheel import TimerWheel


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_deadline_is_served_in_its_second_never_before_it() -> None:
    async def main() -> None:
        clock = Clock(1000.0)
        fired: list[str] = []
        wheel: TimerWheel[str] = TimerWheel(clock, fired.append)
        wheel.add("a", 1000.2)
        wheel.add("b", 1001.0)
        wheel.add("c", 1002.5)
        assert len(wheel) == 3
        wheel.run_due()  # nothing due yet
        assert fired == []
        clock.now = 1000.5  # past a's deadline, not past its bucket (1001)
        wheel.run_due()
        assert fired == []
        clock.now = 1001.0
        wheel.run_due()
        assert sorted(fired) == ["a", "b"]
        clock.now = 1003.0
        wheel.run_due()
        assert sorted(fired) == ["a", "b", "c"] and len(wheel) == 0
        wheel.stop()

    asyncio.run(main())


def test_discarded_entries_do_not_fire_and_the_loop_timer_serves_the_earliest() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        wheel: TimerWheel[str] = TimerWheel(loop.time, fired.append, granularity=0.05)
        t = loop.time()
        late = wheel.add("late", t + 0.3)
        k = wheel.add("gone", t + 0.05)
        wheel.add("soon", t + 0.1)
        wheel.discard("gone", k)
        await asyncio.sleep(0.2)
        assert fired == ["soon"]  # one loop timer, re-armed for the next bucket
        wheel.discard("late", late)
        await asyncio.sleep(0.25)
        assert fired == ["soon"] and len(wheel) == 0
        wheel.stop()

    asyncio.run(main())


def test_an_owner_re_added_while_served_waits_for_the_next_turn() -> None:
    """A fire callback that re-adds an already due deadline does not loop in run_due."""
    async def main() -> None:
        clock = Clock(10.0)
        calls: list[str] = []
        wheel: TimerWheel[str] = TimerWheel(clock, lambda o: (calls.append(o),
                                                              wheel.add(o, clock.now)))
        wheel.add("x", 9.0)
        wheel.run_due()
        assert calls == ["x"] and len(wheel) == 1  # again at the next turn, not in this one
        wheel.run_due()
        assert calls == ["x", "x"]
        wheel.stop()

    asyncio.run(main())
