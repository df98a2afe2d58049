"""A short chaos run (tests/chaos/runner.py) as part of the suite: about 50 seconds of kills under
three clients, then every invariant. Deselect it with `-m "not chaos"`; replay a failure with the
seed it printed: BERTH_CHAOS_SEED=N, or `python -m tests.chaos --duration 50 --clients 3 --seed N`."""
from __future__ import annotations

import os

import pytest

from tests.chaos.runner import chaos

DURATION = 50.0
CLIENTS = 3


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(900)             # the runs cut off by the daemon's kill wait out their deadline
def test_a_short_chaos_run_breaks_no_invariant():
    seed = os.environ.get("BERTH_CHAOS_SEED")
    result = chaos(DURATION, int(seed) if seed else None, CLIENTS)
    assert result.violations == [], f"seed {result.seed}: " + "\n".join(result.violations)
