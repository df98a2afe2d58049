"""berthd and systemd's notify protocol: READY=1 only once every actor answers, WATCHDOG=1 while
all are healthy, STOPPING=1 on SIGTERM. The test plays systemd: it binds NOTIFY_SOCKET and reads
the datagrams berthd sends there."""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from actors.registry import ACTORS
from tests.support import ACTOR_PROBES, descendants, pid_alive

ACTOR_NAMES = [spec.name for spec in ACTORS]


class NotifySocket:
    """The receiving end of sd_notify, as systemd binds it."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[tuple[float, dict[str, str]]] = []

    def next(self, timeout: float) -> dict[str, str] | None:
        """The next datagram as {VAR: value}, or None if none came in time."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.received.append((time.monotonic(), fields))
        return fields

    def wait_for(self, var: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {var} in {timeout}s; got {[f for _, f in self.received]}")
            fields = self.next(remaining)
            if fields is not None and var in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(str(tmp_path))
    yield sock
    sock.close()


def test_ready_only_once_every_actor_answers(make_daemon, notify):
    d = make_daemon().start(wait=False, env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", timeout=20)
    client = d.client(timeout=2.0)

    # At the moment READY=1 arrives, every actor is registered and answering.
    state = client.actors()
    assert {a["name"]: a["status"] for a in state["actors"]} == {n: "running" for n in ACTOR_NAMES}
    assert all(a["pid"] for a in state["actors"])
    assert sorted(state["router"]["up"]) == sorted(ACTOR_NAMES)
    for name in ACTOR_NAMES:
        service, method, args = ACTOR_PROBES[name]
        client.call(service, method, args, timeout=2.0)    # raises if it does not answer in time
    assert client.info()["ready"] is True

    assert ready["READY"] == "1"
    assert ready.get("MAINPID") == str(d.proc.pid)
    assert "STATUS" in ready and "running" in ready["STATUS"]
    # Nothing before it said berthd was failing or going away.
    before = [fields for _, fields in notify.received[:-1]]
    for fields in before:
        assert "ERRNO" not in fields and "STOPPING" not in fields and "READY" not in fields, before
        assert "fail" not in fields.get("STATUS", "").lower(), before
    d.wait_ready()


def test_watchdog_pings_while_healthy(make_daemon, notify):
    d = make_daemon().start(wait=False, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    notify.wait_for("READY", timeout=20)
    d.wait_ready()
    window_end = time.monotonic() + 2.0
    pings = 0
    while (remaining := window_end - time.monotonic()) > 0:
        fields = notify.next(remaining)
        if fields is not None and fields.get("WATCHDOG") == "1":
            pings += 1
    # Half the interval (200 ms) apart, so about ten; systemd would kill us below one per 400 ms.
    assert pings >= 3, [f for _, f in notify.received]


def test_sigterm_sends_stopping_then_exits_zero(make_daemon, notify):
    d = make_daemon().start(wait=False, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    notify.wait_for("READY", timeout=20)
    d.wait_ready()
    pids = descendants(d.proc.pid) | {d.proc.pid}
    assert len(pids) >= len(ACTOR_NAMES) + 2, "supervisor, template and every actor"

    d.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING", timeout=10)
    assert stopping["STOPPING"] == "1"
    assert d.proc.wait(timeout=15) == 0
    assert [pid for pid in pids if pid_alive(pid)] == []
    # No READY or WATCHDOG once it said it was stopping.
    later = []
    while (fields := notify.next(0.05)) is not None:
        later.append(fields)
    assert not any("READY" in f or "WATCHDOG" in f for f in later), later
