import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support import Daemon  # noqa: E402

pytest_plugins = ["tests.registry"]


@pytest.fixture
def daemon():
    """A running berthd on its own temporary root and state."""
    d = Daemon().start()
    yield d
    d.cleanup()


@pytest.fixture
def make_daemon():
    """Factory for tests that need to control start-up (env, several daemons)."""
    made = []

    def make(**kw) -> Daemon:
        d = Daemon(**kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.cleanup()
