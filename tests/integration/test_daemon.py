"""berthd as a whole: how it shows in `ps`, one daemon per state directory, what the CLI says when
there is no daemon, a clean SIGTERM, the metrics endpoint, and `berth debug actors`."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from actors.registry import ACTORS
from berth.version import VERSION
from tests.support import ACTOR_PROBES, REPO, descendants, pid_alive, proc_title

ACTOR_NAMES = [spec.name for spec in ACTORS]


def metric_lines(client) -> list[str]:
    with urllib.request.urlopen(client.info()["metrics"], timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode().splitlines()


def versions(result: subprocess.CompletedProcess) -> dict[str, str]:
    """{"Client": …, "Server": …} from `berth version`'s output."""
    return dict(re.findall(r"^(Client|Server):\s*\n\s*Version:\s*(\S+)", result.stdout, re.MULTILINE))


def server_version(result: subprocess.CompletedProcess) -> str:
    return versions(result)["Server"]


def probe_every_actor(client) -> None:
    for name in ACTOR_NAMES:
        service, method, args = ACTOR_PROBES[name]
        client.call(service, method, args)


def test_every_actor_has_a_probe():
    missing = sorted(set(ACTOR_NAMES) - set(ACTOR_PROBES))
    assert not missing, f"add a cheap request for {missing} to tests.support.ACTOR_PROBES"


def test_processes_are_named_and_version_answers(daemon):
    assert proc_title(daemon.proc.pid) == "berthd"
    pids = daemon.actor_pids()
    assert sorted(pids) == sorted(ACTOR_NAMES)
    for name, pid in pids.items():
        assert proc_title(pid) == f"berthd: {name}", f"actor {name} (pid {pid})"
    # Every actor is a process of this daemon, not of some other one.
    assert set(pids.values()) <= descendants(daemon.proc.pid)

    assert VERSION == "0.1.0"
    assert versions(daemon.cli("version")) == {"Client": "0.1.0", "Server": "0.1.0"}


def test_second_daemon_on_same_state_refuses_and_first_keeps_serving(daemon, make_daemon):
    first = daemon.client().info()
    actors = daemon.actor_pids()
    second = make_daemon(dir=daemon.dir).start(wait=False)
    started = time.monotonic()
    code = second.proc.wait(timeout=15)
    took = time.monotonic() - started
    assert code != 0
    assert took < 10, f"the second berthd took {took:.1f}s to give up"
    message = second.log()
    assert daemon.state in message, message
    assert f"another berthd (pid {daemon.proc.pid})" in message, message

    # The first is untouched: same pid, its socket still there, still answering.
    assert os.path.exists(daemon.address)
    assert daemon.proc.poll() is None
    assert daemon.client().info()["pid"] == first["pid"] == daemon.proc.pid
    assert daemon.actor_pids() == actors
    assert server_version(daemon.cli("version")) == VERSION
    probe_every_actor(daemon.client())

    # Another state directory is another daemon, side by side.
    other = make_daemon().start()
    assert other.state != daemon.state
    assert server_version(other.cli("version")) == VERSION
    assert server_version(daemon.cli("version")) == VERSION
    assert other.client().info()["pid"] != daemon.client().info()["pid"]


def run_cli(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.cli.main", "-a", address, *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))


def test_cli_without_a_daemon_says_so_in_one_line(tmp_path):
    missing = str(tmp_path / "berth.sock")
    result = run_cli(missing, "version")
    assert result.returncode == 1
    assert result.stderr == f"berth: cannot reach berthd at {missing} (no such socket; is it running?)\n"
    assert "Server:" not in result.stdout

    # A socket file left behind by a daemon that is gone: nothing accepts on it.
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    result = run_cli(stale, "namespaces", "ls")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"berth: cannot reach berthd at {stale} (")
    assert lines[0].endswith("is it running?)")
    assert "Traceback" not in result.stderr


def test_sigterm_stops_everything_and_removes_the_socket(daemon):
    pids = descendants(daemon.proc.pid)
    actors = set(daemon.actor_pids().values())
    assert actors <= pids
    assert len(pids) >= len(ACTOR_NAMES) + 1, "the template and every actor"
    assert os.path.exists(daemon.address)

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=15) == 0
    # berthd waits for its actors and its template before it exits.
    assert [pid for pid in pids | {daemon.proc.pid} if pid_alive(pid)] == []
    assert not os.path.exists(daemon.address)
    assert not os.path.exists(os.path.join(daemon.state, "actors.sock"))
    log = daemon.log()
    assert "did not stop in time" not in log
    assert "stopped" in log


def test_metrics_count_requests_by_service_method_and_code(daemon):
    client = daemon.client()
    assert isinstance(client.namespaces.list(), list)
    wanted = 'berth_requests_total{code="OK",method="list_namespaces",service="metadata"}'
    lines = metric_lines(client)
    found = [line for line in lines if line.startswith(wanted + " ")]
    assert len(found) == 1, "\n".join(lines)
    assert float(found[0].split()[1]) >= 1.0

    client.namespaces.list()
    after = [line for line in metric_lines(client) if line.startswith(wanted + " ")]
    assert float(after[0].split()[1]) == float(found[0].split()[1]) + 1

    url = client.info()["metrics"]
    assert url.endswith("/v1/metrics")
    elsewhere = url[: -len("/v1/metrics")] + "/metrics"
    try:
        urllib.request.urlopen(elsewhere, timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 404
    else:
        raise AssertionError(f"GET {elsewhere} did not fail")


def test_metrics_can_be_disabled(make_daemon):
    d = make_daemon(metrics=False).start()
    info = d.client().info()
    assert info["ready"] is True
    assert info["metrics"] is None


def test_debug_actors_lists_every_actor_running(daemon):
    pids = daemon.actor_pids()
    lines = daemon.cli("debug", "actors").stdout.splitlines()
    header = lines[0].split()
    assert header[:5] == ["ACTOR", "PID", "STATUS", "RESTARTS", "RENEWALS"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert sorted(rows) == sorted(ACTOR_NAMES)
    for name, row in rows.items():
        assert row[1] == str(pids[name]), row
        assert row[2] == "running", row
        assert row[3:5] == ["0", "0"], row

    # The same, as JSON.
    state = json.loads(daemon.cli("debug", "actors", "--format", "json").stdout)
    assert {a["name"]: (a["pid"], a["status"]) for a in state["actors"]} == \
        {name: (pid, "running") for name, pid in pids.items()}


def test_second_daemon_on_same_root_refuses(daemon, tmp_path):
    other_state = tempfile.mkdtemp(prefix="berth-t-", dir="/tmp")
    try:
        result = subprocess.run([sys.executable, "-m", "actors.supervisor", "--root", daemon.root,
                                 "--state", other_state, "--metrics-address", ""],
                                capture_output=True, text=True, timeout=30, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=REPO))
        assert result.returncode != 0
        assert f"root directory {daemon.root}" in result.stderr, result.stderr
        assert daemon.client().info()["pid"] == daemon.proc.pid
    finally:
        shutil.rmtree(other_state, ignore_errors=True)


def test_children_do_not_hold_the_directory_locks(daemon):
    for pid in descendants(daemon.proc.pid):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                assert not os.readlink(f"/proc/{pid}/fd/{fd}").endswith("berthd.lock"), pid
