"""berth's own publishers (bus.pubsub): after the first event, events go to the events actor's
own socket, not through the router; when the events actor dies, none is lost or reordered."""
from __future__ import annotations

import os
import re
import signal
import urllib.request

from bus.pubsub import Publisher
from tests.support import wait_until


def forwards_routed(client) -> float:
    """berth_requests_total for events.forward: the forwards that went through the router."""
    with urllib.request.urlopen(client.info()["metrics"], timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r'^berth_requests_total\{code="OK",method="forward",service="events"\} (\S+)$',
                       text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def published(client, topic: str) -> list[dict]:
    return [e for e in client.events.replay(0) if e["topic"] == topic]


def test_events_after_the_first_skip_the_router(daemon, tmp_path):
    client = daemon.client()
    publisher = Publisher(daemon.address, str(tmp_path / "spool"))
    try:
        before = forwards_routed(client)
        for i in range(6):
            publisher.publish("default", "/test/direct", {"n": i})
        wait_until(lambda: len(published(client, "/test/direct")) == 6, 10.0, 0.02, "the six events")
        assert [e["event"]["n"] for e in published(client, "/test/direct")] == list(range(6))
        assert forwards_routed(client) - before <= 1      # at most the first: its answer shows the way
        assert client.events.head() == published(client, "/test/direct")[-1]["seq"]
    finally:
        publisher.close()
        client.close()


def test_events_published_while_the_events_actor_restarts_all_arrive_in_order(daemon, tmp_path):
    client = daemon.client()
    publisher = Publisher(daemon.address, str(tmp_path / "spool"))
    try:
        for i in range(2):                       # the second one on the events actor's own socket
            publisher.publish("default", "/test/restart", {"n": i})
        wait_until(lambda: len(published(client, "/test/restart")) == 2, 10.0, 0.02, "the first events")
        old = next(a for a in client.actors()["actors"] if a["name"] == "events")["pid"]
        os.kill(old, signal.SIGKILL)
        for i in range(2, 8):
            publisher.publish("default", "/test/restart", {"n": i})
        wait_until(lambda: len(published(client, "/test/restart")) >= 8, 15.0, 0.05,
                   "the events published while the events actor was down")
        events = published(client, "/test/restart")
        assert [e["event"]["n"] for e in events] == list(range(8))        # each once, in order
        assert len({e["seq"] for e in events}) == 8
        assert next(a for a in client.actors()["actors"] if a["name"] == "events")["pid"] != old
        assert publisher.pending() == 0
    finally:
        publisher.close()
        client.close()
