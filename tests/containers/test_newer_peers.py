"""The partner scenarios of test_containers.py against Debian 13's servers (Prosody 13,
ejabberd 24.12, jabberd2 2.7) in containers: the same image of ours, the same cells. The
scenarios about our own image (health, restarts, SIGTERM) run once, in test_containers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_netns
from tests.containers.harness import Federation, federation
from tests.containers.test_containers import (  # noqa: F401 - collected here with this `fed`
    test_federation,
    test_refused_both_ways,
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    require_netns()
    with federation(tmp_path_factory.mktemp("containers-trixie"), "trixie") as f:
        yield f
