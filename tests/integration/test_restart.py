"""Crashes and restarts: a killed actor comes back and the requests sent to it meanwhile are
answered; requests whose deadline passes meanwhile fail with DeadlineExceeded; actors die with
the supervisor; the event log outlives the daemon."""
from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import time
import urllib.request

import pytest
import zmq

from actors.registry import ACTORS
from berth.client import Client
from bus.client import zmq_address
from bus.envelope import Reply, Request
from bus.errors import DeadlineExceeded
from tests.support import ACTOR_PROBES, descendants, pid_alive, proc_title, wait_until

ACTOR_NAMES = [spec.name for spec in ACTORS]


def restart_count(client: Client, actor: str) -> float:
    """berth_actor_restarts_total for one actor, from the metrics endpoint (0 before the first)."""
    with urllib.request.urlopen(client.info()["metrics"], timeout=10) as resp:
        text = resp.read().decode()
    pattern = rf'^berth_actor_restarts_total\{{actor="{re.escape(actor)}"\}} (\S+)$'
    found = re.findall(pattern, text, re.MULTILINE)
    assert len(found) <= 1, text
    return float(found[0]) if found else 0.0


def probe_once(address: str, actor: str, timeout: float = 10.0):
    """One request to the actor from a client of its own, sent once (no client-side retry)."""
    client = Client(address, timeout=timeout)
    try:
        service, method, args = ACTOR_PROBES[actor]
        return client.call(service, method, args)
    finally:
        client.close()


def actor_state(client: Client, name: str) -> dict:
    return next(a for a in client.actors()["actors"] if a["name"] == name)


def wait_restarted(client: Client, name: str, old_pid: int, timeout: float) -> dict:
    """The actor's new incarnation: another pid, named like the old one, registered and running."""
    def back():
        a = actor_state(client, name)
        if a["status"] == "running" and a["pid"] not in (None, old_pid) \
                and proc_title(a["pid"]) == f"berthd: {name}":
            return a
        return None
    return wait_until(back, timeout, 0.01, f"actor {name} to come back after kill -9")


def raw_request(address: str, service: str, method: str, deadline_in: float, wait: float) -> Reply | None:
    """Send one request whose deadline is `deadline_in` seconds away and wait up to `wait` seconds
    (far longer) for berthd's own answer; None if it never answers."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(zmq_address(address))
        sock.send(Request(7, service, method, "default", None, time.time() + deadline_in, {}).encode())
        if not sock.poll(int(wait * 1000)):
            return None
        return Reply.decode(sock.recv_multipart()[0])
    finally:
        sock.close()


def test_killed_actors_come_back_and_requests_sent_meanwhile_succeed(daemon):
    client = daemon.client()
    for name in ACTOR_NAMES:
        pids = daemon.actor_pids()
        before = actor_state(client, name)
        counted = restart_count(client, name)
        old = pids[name]

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            os.kill(old, signal.SIGKILL)
            killed_at = time.monotonic()
            pending = pool.submit(probe_once, daemon.address, name)
            new = wait_restarted(client, name, old, timeout=2.0)
            back_after = time.monotonic() - killed_at
            # Sent while the actor was down, answered by its successor: a success, not an error.
            assert pending.result(timeout=10) is not None

        assert back_after < 2.0
        assert not pid_alive(old)
        assert new["pid"] in descendants(daemon.proc.pid)
        assert new["restarts"] == before["restarts"] + 1
        assert restart_count(client, name) == counted + 1
        # The others were left alone.
        others = {n: p for n, p in daemon.actor_pids().items() if n != name}
        assert others == {n: p for n, p in pids.items() if n != name}
        assert probe_once(daemon.address, name) is not None
    state = client.actors()
    assert state["router"]["in_flight"] == 0 and state["router"]["queued"] == {}


def test_actors_and_template_die_with_the_supervisor(daemon, make_daemon):
    pids = descendants(daemon.proc.pid)
    titles = {proc_title(pid) for pid in pids}
    assert titles >= {"berthd: template", *(f"berthd: {n}" for n in ACTOR_NAMES)}

    daemon.kill9()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5.0, 0.02,
               f"the processes of a kill -9'd berthd to go: {sorted(pids)}")

    # Nothing of the old one is left in the way: its lock, sockets and pid file do not stop the next.
    again = make_daemon(dir=daemon.dir).start()
    assert sorted(again.actor_pids()) == sorted(ACTOR_NAMES)
    for name in ACTOR_NAMES:
        assert probe_once(again.address, name) is not None


def template_pid(daemon) -> int:
    found = [pid for pid in descendants(daemon.proc.pid) if proc_title(pid) == "berthd: template"]
    assert len(found) == 1, found
    return found[0]


def test_request_whose_deadline_passes_while_its_actor_is_down_gets_deadline_exceeded(daemon):
    client = daemon.client()
    template = template_pid(daemon)
    for name in ACTOR_NAMES:
        service, method, args = ACTOR_PROBES[name]
        old = daemon.actor_pids()[name]
        # Keep the actor down for as long as this takes: its successor would be forked by the
        # template, which is frozen (and so does not even reap the dead one).
        os.kill(template, signal.SIGSTOP)
        try:
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: not pid_alive(old), 2.0, 0.001, f"actor {name} to die")

            # berthd answers DeadlineExceeded itself, soon after the deadline.
            started = time.monotonic()
            reply = raw_request(daemon.address, service, method, deadline_in=0.05, wait=5.0)
            assert reply is not None, f"berthd never answered a {name} request whose deadline passed"
            assert time.monotonic() - started < 1.0
            assert reply.id == 7 and not reply.ok
            assert reply.error["code"] == "DeadlineExceeded", reply.error

            # Through the client library: the exception, promptly, not a hang.
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.conn.call(service, method, args, timeout=0.05)
            assert time.monotonic() - started < 1.0

            assert actor_state(client, name)["pid"] in (None, old), "it came back: nothing was tested"
        finally:
            os.kill(template, signal.SIGCONT)
        wait_restarted(client, name, old, timeout=5.0)

        # The expired requests are gone from the router, not delivered late to the new actor.
        def drained():
            router = client.actors()["router"]
            return router["in_flight"] == 0 and router["queued"] == {}
        wait_until(drained, 2.0, 0.02, "the router to drop the expired requests")
        assert client.call(service, method, args) is not None


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_event_log_survives_a_daemon_restart(daemon, make_daemon, stop):
    client = daemon.client()
    seqs = [client.events.publish("/test/thing", {"n": i}) for i in range(5)]
    assert len(set(seqs)) == 5 and seqs == sorted(seqs)
    head = client.events.head()
    assert head == seqs[-1]
    published = [e for e in client.events.replay(0) if e["topic"] == "/test/thing"]
    assert [e["seq"] for e in published] == seqs
    assert [e["event"] for e in published] == [{"n": i} for i in range(5)]
    client.close()

    pids = descendants(daemon.proc.pid) | {daemon.proc.pid}
    if stop == "sigterm":
        assert daemon.stop() == 0
    else:
        daemon.kill9()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5.0, 0.02, "the old berthd to go")

    again = make_daemon(dir=daemon.dir).start()
    client = again.client()
    assert client.info()["pid"] != daemon.proc.pid
    assert client.events.head() == head
    replayed = [e for e in client.events.replay(0) if e["topic"] == "/test/thing"]
    assert replayed == published               # same seqs, timestamps, ids and bodies
    assert client.events.publish("/test/thing", {"n": 5}) == head + 1
    assert [e["seq"] for e in client.events.replay(head)] == [head + 1]


def test_a_request_held_when_berthd_is_killed_fails_fast_or_is_sent_again(daemon, make_daemon):
    """The berthd holding a request is killed and another starts: the client does not wait out
    its deadline. A plain call says Unavailable (it may or may not have been done); an idempotent
    one is sent again to the new berthd and answered."""
    from bus.client import Connection
    from bus.errors import Unavailable
    client = daemon.client(timeout=10)
    client.set_failpoint("worker.dispatch.metadata.list_namespaces", "2*delay(60000)")
    held = concurrent.futures.ThreadPoolExecutor(2)

    def call(idempotent: bool):
        conn = Connection(daemon.address, timeout=120)
        try:
            return conn.call("metadata", "list_namespaces", idempotent=idempotent)
        finally:
            conn.close()
    plain, retried = held.submit(call, False), held.submit(call, True)
    wait_until(lambda: _held(client) >= 2, 15, what="both requests held by the metadata actor")
    daemon.kill9()
    wait_until(lambda: not any(pid_alive(p) for p in daemon.known_pids), 15, what="the old berthd's processes to go")
    make_daemon(dir=daemon.dir).start()
    with pytest.raises(Unavailable, match="went away with the request"):
        plain.result(timeout=60)
    assert isinstance(retried.result(timeout=60), list)
    held.shutdown()


def _held(client) -> int:
    """Requests the router has forwarded and not seen answered."""
    return client.actors()["router"]["in_flight"]
