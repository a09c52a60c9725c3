"""Shared test guard: anything that opens sockets or starts servers runs only inside the
private network namespace made by scripts/netns-run (only loopback; DNS = our dnsmasq)."""

import os

import pytest

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
