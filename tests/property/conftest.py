"""Hypothesis settings for the property tests.

`make test` runs the "ci" profile: a fixed number of examples per test, derandomized so a CI
failure reproduces on any machine, and no example database written into the tree. Set
BERTH_HYPOTHESIS_PROFILE=fuzz (and pass --timeout 0) for a long, randomized local run.
Hypothesis's own caches and the patches it writes for failing examples go to the temporary
directory, not the tree.
"""
import os
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "berth-hypothesis"))

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "fuzz", max_examples=20_000, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("BERTH_HYPOTHESIS_PROFILE", "ci"))
