"""The daemons' event loop: asyncio's own or uvloop's (issue 11, docs/benchmarks.md "uvloop").

`[edge] event_loop` and `[gateway] event_loop` take "asyncio" (the default), "uvloop" (a
configuration error when it is not installed) or "auto" (uvloop when it is installed, else
asyncio's). uvloop is an optional extra: `pip install 'xmpp-federation-edge[uvloop]'`. It is not
the default because it did not win where the daemons spend their time: measured against
asyncio's loop in the same runs, the edge's relay was no cheaper per message (and slower), its
set-ups 6-11% cheaper, the gateway's delivery to a WebSocket 12% dearer (docs/benchmarks.md
"uvloop").
The environment variable EDGE_EVENT_LOOP, when set, overrides the file for both daemons: the
test suite and the benches force a loop with it (README, first section; docs/benchmarks.md),
and an operator can try one without editing the configuration.

Nothing else in the daemons depends on the loop: the listeners' accept loop
(`edgeproxy.listener`) uses only `add_reader` and `connect_accepted_socket`, TLS is a memory BIO
of our own over plain transports, and signals go through `loop.add_signal_handler`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
DEFAULT = "asyncio"  # both daemons (the module doc says why)
ENV = "EDGE_EVENT_LOOP"
INSTALL = "pip install 'xmpp-federation-edge[uvloop]'"

T = TypeVar("T")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def problem(section: str, value: object) -> str | None:
    """The configuration error for `[section] event_loop = value`, or None when it can run."""
    if value not in EVENT_LOOPS:
        return (f"[{section}] event_loop: must be \"auto\", \"uvloop\" or \"asyncio\" "
                f"(got {value!r})")
    if value == "uvloop" and not uvloop_installed():
        return (f"[{section}] event_loop: \"uvloop\" is not installed; install it with "
                f"{INSTALL} (or set \"auto\" or \"asyncio\")")
    return None


@dataclass(frozen=True, slots=True)
class Choice:
    name: str  # "uvloop" | "asyncio": the loop that runs
    asked: str  # what was asked for: one of EVENT_LOOPS
    source: str  # where it was asked: "[edge] event_loop" or "$EDGE_EVENT_LOOP"

    def describe(self) -> str:
        """For the start-up log line: which loop, its version, and who chose it."""
        if self.name == "uvloop":
            import uvloop

            what = f"uvloop {uvloop.__version__}"
        else:
            what = f"asyncio ({platform.python_implementation()} {platform.python_version()})"
        why = f"{self.source} = \"{self.asked}\""
        if self.asked == "auto":
            why += ": uvloop is installed" if self.name == "uvloop" else \
                f": uvloop is not installed ({INSTALL})"
        return f"{what} ({why})"


def choose(section: str, configured: str) -> Choice:
    """The loop for a daemon whose file says `configured`; $EDGE_EVENT_LOOP wins when set.
    ValueError (the configuration error's text) when the variable asks for what cannot run."""
    asked, source = configured, f"[{section}] event_loop"
    env = os.environ.get(ENV, "").strip()
    if env:
        asked, source = env, f"${ENV}"
        error = problem(section, env)
        if error is not None:
            raise ValueError(error.replace(f"[{section}] event_loop", f"${ENV}", 1))
    if asked == "auto":
        return Choice("uvloop" if uvloop_installed() else "asyncio", asked, source)
    return Choice(asked, asked, source)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What asyncio.Runner makes its loop with (as uvloop.run does): asyncio's own loop is
    named, not taken from the event loop policy, so "asyncio" means it whatever the policy."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


def run(main: Coroutine[Any, Any, T], choice: Choice) -> T:
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice.name)) as runner:
        return runner.run(main)


def running() -> str:
    """The name of the loop this code runs on: "uvloop" or "asyncio" (for /health)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
