"""berth's own publishers (bus.pubsub): after the first event, events go to the events actor's
own socket, not through the router; when the events actor dies, none is lost or reordered."""
from __future__ import annotations

import os
import signal

from bus.pubsub import Publisher
from tests.support import wait_until


def published(client, topic: str) -> list[dict]:
    return [e for e in client.events.replay(0) if e["topic"] == topic]


def test_events_after_the_first_skip_the_router(daemon, tmp_path):
    """Once the first answer has shown the way, forwards through the router fail (a failpoint) and
    the next events still arrive, in order: they did not take the router's way."""
    client = daemon.client()
    publisher = Publisher(daemon.address, str(tmp_path / "spool"))
    try:
        publisher.publish("default", "/test/direct", {"n": 0})
        wait_until(lambda: len(published(client, "/test/direct")) == 1, 10.0, 0.02, "the first event")
        client.set_failpoint("router.forward.events.forward", "error(Unavailable)")
        for i in range(1, 6):
            publisher.publish("default", "/test/direct", {"n": i})
        wait_until(lambda: len(published(client, "/test/direct")) == 6, 10.0, 0.02, "the six events")
        assert [e["event"]["n"] for e in published(client, "/test/direct")] == list(range(6))
        assert client.events.head() == published(client, "/test/direct")[-1]["seq"]
    finally:
        client.clear_failpoints()
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
