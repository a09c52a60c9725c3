"""Shared test guard: anything that opens sockets or starts servers runs only inside the
private network namespace made by scripts/netns-run (only loopback; DNS = our dnsmasq).

The event loop: the tests run on the daemons' default loop (edgeproxy.eventloop.DEFAULT,
asyncio's); EDGE_EVENT_LOOP=uvloop (or =asyncio, =auto) forces one, for the tests in this process
and, inherited, for every daemon they start: `EDGE_EVENT_LOOP=uvloop ./scripts/test` runs the
whole suite on uvloop."""

import asyncio
import os

import pytest

from edgeproxy import eventloop

SUITE_LOOP = eventloop.choose("edge", eventloop.DEFAULT)  # ValueError: a bad EDGE_EVENT_LOOP
if SUITE_LOOP.name == "uvloop":
    import uvloop

    # The policy, not only pytest-asyncio's loop factory: tests that run asyncio.run() or
    # make loops in threads get uvloop too.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def pytest_report_header() -> str:
    return f"event loop: {SUITE_LOOP.describe().replace('[edge] event_loop', 'default')}"

NETNS_MESSAGE = ("run the tests through scripts/test (private network namespace): this test "
                 "opens sockets and starts servers on fixed 127.x addresses")


def require_netns() -> None:
    if os.environ.get("EDGE_IN_NETNS") != "1":
        pytest.fail(NETNS_MESSAGE, pytrace=False)


@pytest.fixture(scope="module")
def netns_guard() -> None:
    """Request this (first) in any fixture or test that opens sockets."""
    require_netns()


@pytest.fixture(scope="module", autouse=True)
def _netns_guard_for_socket_tests(request: pytest.FixtureRequest) -> None:
    # Module scope and autouse, so it runs before the module-scoped server fixtures start.
    path = request.path.as_posix()
    if "/tests/interop/" in path or path.endswith(("/tests/test_dns.py",
                                                   "/tests/test_federation.py")):
        require_netns()
