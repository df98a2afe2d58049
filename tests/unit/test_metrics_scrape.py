"""The metrics endpoint while actors come and go: each process's samples are a file in the
multiprocess directory, and a scrape may meet one that a process has just created and not yet
sized. Such a scrape is read again, and never answers 500."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.support import REPO

SERVER = """
import sys
from actors import metrics
metrics.observe_request("content", "info", "", 0.001)
server = metrics.MetricsServer("127.0.0.1:0")
print(server.address, flush=True)
sys.stdin.read()
server.close()
"""


@pytest.fixture
def endpoint(tmp_path):
    """(url, multiprocess directory) of a MetricsServer in a process of its own, as berthd's."""
    samples = tmp_path / "metrics"
    samples.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(samples),
                                                          PYTHONPATH=REPO))
    try:
        yield f"http://{proc.stdout.readline().strip()}/v1/metrics", samples
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0


def scrape(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_scrape_sums_the_processes_files(endpoint):
    url, _ = endpoint
    status, body = scrape(url)
    assert status == 200
    assert 'berth_requests_total{code="OK",method="info",service="content"} 1.0' in body


def test_a_file_not_yet_sized_is_unavailable_not_an_internal_error(endpoint):
    url, samples = endpoint
    (samples / "counter_4242.db").touch()          # created by a new process, not yet sized
    status, body = scrape(url)
    assert status == 503 and "try again" in body
    (samples / "counter_4242.db").unlink()
    assert scrape(url)[0] == 200
