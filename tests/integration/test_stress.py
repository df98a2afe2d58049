"""`berth-stress` against a real berthd, busybox from a real registry, runc.

The `berth` fixture (test_run.py) gives each test its own namespace with busybox pulled, and
removes by force whatever a test left; the tests check that the tool itself left nothing.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys

import pytest

from berth.stress import parse_duration, percentile
from tests.integration import test_run
from tests.support import REPO, pid_alive, wait_until

berth = test_run.berth             # the fixture


def stress_cmd(berth, *args: str) -> list[str]:
    return [sys.executable, "-m", "berth.stress", "-a", berth.daemon.address, "-n", berth.ns, *args]


def stress(berth, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(stress_cmd(berth, *args), capture_output=True, text=True, timeout=timeout,
                          env=berth.daemon.env, cwd=REPO)


def assert_nothing_left(berth) -> None:
    assert berth.client.tasks.list() == []
    assert berth.client.containers.list() == []
    assert not [s for s in berth.client.snapshots.list() if s["kind"] == "active"]


def test_durations_and_percentiles():
    assert [parse_duration(t) for t in ("10s", "1m", "1m30s", "500ms", "2h", "45", "2.5")] == \
        [10, 60, 90, 0.5, 7200, 45, 2.5]
    for bad in ("", "0", "-3s", "10x", "1m 30s", "s"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_concurrent_runs_report_rates_and_latencies_and_leave_nothing(berth):
    # The namespace lacks the image: the tool pulls it first.
    berth.client.images.delete(berth.image)
    result = stress(berth, "-c", "2", "-d", "3s", "--json", "--plain-http", "--image", berth.image)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["image_pulled"] is True and report["image"] == berth.image
    assert report["runs"] > 0 and report["succeeded"] == report["runs"]
    assert (report["failures"], report["errors"], report["aborted"]) == (0, [], 0)
    assert report["concurrency"] == 2 and report["command"] == ["true"]
    assert report["elapsed"] >= 3 and report["containers_per_second"] > 0
    latency = report["latency_ms"]
    assert set(latency) == {"run", "create", "start", "wait", "delete"}
    for name, cells in latency.items():
        assert set(cells) == {"p50", "p95", "p99"}
        assert 0 < cells["p50"] <= cells["p95"] <= cells["p99"], (name, cells)
    assert latency["run"]["p50"] >= latency["create"]["p50"]
    assert_nothing_left(berth)
    # Every run's container was there, labelled, in the event log; all of them went.
    created = [e["event"] for e in berth.client.events.replay(0)
               if e["topic"] == "/containers/create" and e.get("namespace") == berth.ns]
    assert len(created) == report["runs"]
    assert len({c["id"] for c in created}) == report["runs"]


def test_text_report_and_failing_runs(berth):
    result = stress(berth, "-d", "1s", "--image", berth.image, "--command", "sh -c 'exit 3'")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert " runs in " in lines[0] and "containers/s" in lines[0]
    failures = int(lines[0].rsplit(", ", 1)[1].split()[0])
    assert failures > 0
    assert lines[2].split() == ["latency", "(ms)", "p50", "p95", "p99"]
    assert [line.split()[0] for line in lines[3:8]] == ["run", "create", "start", "wait", "delete"]
    assert lines[3].split()[1:] == ["-", "-", "-"]          # no run succeeded
    assert lines[8] == "first errors:"
    assert "sh -c 'exit 3' exited with status 3" in lines[9]
    assert_nothing_left(berth)


def test_density_measures_every_shim_and_removes_them(berth):
    result = stress(berth, "density", "--count", "3", "--image", berth.image, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] == 3 and len(report["shims"]) == 3
    assert all(s["pss_kib"] > 0 and s["rss_kib"] >= s["pss_kib"] for s in report["shims"])
    assert report["pss_kib"] == sum(s["pss_kib"] for s in report["shims"])
    assert report["pss_per_shim_kib"] == report["pss_kib"] // 3
    assert report["rss_kib"] == sum(s["rss_kib"] for s in report["shims"])
    assert len({s["pid"] for s in report["shims"]}) == 3
    wait_until(lambda: not any(pid_alive(s["pid"]) for s in report["shims"]), 15, what="the shims to exit")
    assert_nothing_left(berth)


def test_sigterm_kills_and_removes_the_runs_in_flight(berth):
    proc = subprocess.Popen(stress_cmd(berth, "-c", "2", "-d", "5m", "--json", "--image", berth.image,
                                       "--command", "sleep 300"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=berth.daemon.env, cwd=REPO)
    try:
        def both_sleeping():
            tasks = berth.client.tasks.list()
            return tasks if len(tasks) == 2 and all(t["status"] == "running" for t in tasks) else None
        running = wait_until(both_sleeping, 60, what="a sleeping task from each worker")
        labels = [berth.client.containers.get(t["container_id"])["labels"] for t in running]
        assert all(set(label) == {"berth.stress"} for label in labels)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    report = json.loads(out)
    assert report["interrupted"] == "SIGTERM"
    assert (report["failures"], report["aborted"]) == (0, 2)
    assert_nothing_left(berth)


def test_a_bad_image_is_one_clear_line_and_a_failure(berth):
    missing = berth.image.rsplit(":", 1)[0] + ":no-such-tag"
    result = stress(berth, "-d", "1s", "--plain-http", "--image", missing)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"berth-stress: cannot pull {missing}: "), result.stderr
    assert "Traceback" not in result.stderr
    malformed = stress(berth, "density", "--count", "1", "--image", "UPPER//case")
    assert malformed.returncode == 1
    assert malformed.stderr.splitlines()[-1].startswith("berth-stress: "), malformed.stderr
    assert "Traceback" not in malformed.stderr
    assert_nothing_left(berth)
