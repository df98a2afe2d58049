"""The event bus as its users meet it: the client's subscribe/replay/publish, `berth events`, a
raw ZeroMQ subscriber that stops reading, and the subscriber gauge on /v1/metrics."""
from __future__ import annotations

import calendar
import json
import re
import threading
import time
import urllib.request

import pytest
import zmq

from berth.cli.events import format_time
from bus.envelope import Reply, Request
from tests.support import rss_kib, wait_until

MiB = 1024           # rss_kib() counts KiB


class Subscriber(threading.Thread):
    """`client.events.subscribe` in a thread of its own, with a client of its own."""

    def __init__(self, daemon, since: int, want: int, timeout: float = 120.0, filters=()):
        super().__init__(name=f"subscriber-since-{since}", daemon=True)
        self.client = daemon.client()
        self.since, self.want, self.timeout, self.filters = since, want, timeout, list(filters)
        self.got: list[dict] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.events.subscribe(since=self.since, filters=self.filters, timeout=self.timeout)
            try:
                for envelope in stream:
                    self.got.append(envelope)
                    if len(self.got) >= self.want:
                        break
            finally:
                stream.close()
        except BaseException as e:           # handed to the test by finish()
            self.error = e
        finally:
            self.client.close()

    def finish(self, timeout: float) -> list[dict]:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still running after {timeout}s with {len(self.got)} events"
        if self.error is not None:
            raise self.error
        return self.got


@pytest.fixture
def client(daemon):
    client = daemon.client()
    yield client


def events_stats(daemon) -> dict:
    """The events actor's own report (refreshed by the supervisor's ping, once a second)."""
    client = daemon.client()
    try:
        actors = client.actors()["actors"]
    finally:
        client.close()
    return next(a["stats"] for a in actors if a["name"] == "events")


def assert_consecutive(envelopes: list[dict], first_seq: int) -> None:
    seqs = [e["seq"] for e in envelopes]
    assert seqs == list(range(first_seq, first_seq + len(seqs))), \
        f"sequence numbers not consecutive from {first_seq}: first break at " \
        f"{next((i for i, (a, b) in enumerate(zip(seqs, seqs[1:])) if b != a + 1), None)}"


def publish_pipelined(address: str, topic: str, events: list[dict], window: int = 64) -> list[int]:
    """Publish through `events.forward` with up to `window` requests in flight (raw DEALER), as a
    busy berthd's own publishers would; returns the sequence numbers in the order sent."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{address}")
    seqs: dict[int, int] = {}
    sent = 0
    try:
        while len(seqs) < len(events):
            while sent < len(events) and sent - len(seqs) < window:
                req = Request(sent, "events", "forward", "default", None, time.time() + 60,
                              {"topic": topic, "event": events[sent]})
                sock.send(req.encode())
                sent += 1
            assert sock.poll(60_000), f"no answer to forward after {len(seqs)} of {len(events)}"
            reply = Reply.decode(sock.recv())
            seqs[reply.id] = reply.unwrap()["seq"]
    finally:
        sock.close()
    return [seqs[i] for i in range(len(events))]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines()
              if re.match(rf"{re.escape(name)}(\{{.*\}})? ", line)]
    return sum(values)


# --- fan-out ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_three_subscribers_each_receive_all_10000_events_in_order(daemon, client):
    count = 10_000
    start = client.events.head()
    subscribers = [Subscriber(daemon, since=start, want=1 + count) for _ in range(3)]
    for s in subscribers:
        s.start()
    # Every subscriber must be reading live before the run starts: each has seen the warm-up
    # event, and the events actor counts three subscriptions on its PUB socket.
    warmup = client.events.publish("/test/warmup", {})
    assert warmup == start + 1
    wait_until(lambda: all(s.got or s.error for s in subscribers), 20, what="warm-up event at every subscriber")
    wait_until(lambda: events_stats(daemon).get("subscribers", 0) >= 3, 20, what="three subscriptions")

    began = time.monotonic()
    for i in range(count):
        assert client.events.publish("/test/tick", {"n": i}) == warmup + 1 + i
    published = time.monotonic() - began
    for s in subscribers:
        got = s.finish(timeout=120)
        assert len(got) == 1 + count
        assert got[0]["topic"] == "/test/warmup"
        assert_consecutive(got, warmup)
        assert [e["event"]["n"] for e in got[1:]] == list(range(count))
        assert {e["topic"] for e in got[1:]} == {"/test/tick"}
        assert {e["namespace"] for e in got} == {"default"}
    assert client.events.head() == warmup + count
    assert published < 120, f"publishing {count} events took {published:.1f}s"


def test_resubscribing_since_n_gets_exactly_the_missed_events(daemon, client):
    start = client.events.head()
    for i in range(50):
        client.events.publish("/test/tick", {"n": i})

    # Read part of what is there, then go away.
    first = Subscriber(daemon, since=start, want=20, timeout=30)
    first.start()
    seen = first.finish(timeout=40)
    assert_consecutive(seen, start + 1)
    last_seen = seen[-1]["seq"]

    # While it is away, and while it comes back, events keep coming.
    stop = threading.Event()
    publisher_error: list[BaseException] = []

    def publish_until_stopped():
        pub = daemon.client()
        try:
            i = 50
            while not stop.is_set():
                pub.events.publish("/test/tick", {"n": i})
                i += 1
        except BaseException as e:
            publisher_error.append(e)
        finally:
            pub.close()

    publisher = threading.Thread(target=publish_until_stopped, daemon=True)
    publisher.start()
    try:
        wait_until(lambda: client.events.head() >= last_seen + 300, 30, what="300 events while away")
        again = Subscriber(daemon, since=last_seen, want=10**9, timeout=60)
        again.start()
        wait_until(lambda: len(again.got) >= 500 or again.error, 30, what="the resubscriber to get 500 events")
    finally:
        stop.set()
        publisher.join(30)
    assert not publisher.is_alive() and not publisher_error, publisher_error
    end = client.events.publish("/test/end", {})
    wait_until(lambda: (again.got and again.got[-1]["seq"] >= end) or again.error, 30,
               what="the resubscriber to reach the end marker")
    again.want = 0                           # stop at the next event
    client.events.publish("/test/after", {})
    got = again.finish(timeout=30)

    # Exactly what came after last_seen: nothing twice, nothing skipped, in order.
    upto_end = [e for e in got if e["seq"] <= end]
    assert_consecutive(upto_end, last_seen + 1)
    assert upto_end[-1]["topic"] == "/test/end"
    assert [e["event"]["n"] for e in upto_end[:-1]] == list(range(20, 20 + len(upto_end) - 1))
    replayed = list(client.events.replay(last_seen))
    assert [e["seq"] for e in replayed[:len(upto_end)]] == [e["seq"] for e in upto_end]
    assert replayed[:len(upto_end)] == upto_end


# --- the CLI -------------------------------------------------------------------------------------

TEXT_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9} \+0000 UTC) (\S*) (/\S+) (\{.*\})")


def test_cli_events_filter_prints_matching_lines(daemon, client):
    for i in range(4):
        client.events.publish("/test/a", {"n": i, "name": f"a{i}"})
        client.events.publish("/test/b", {"n": i})
    expected = [e for e in client.events.replay(0) if e["topic"] == "/test/a"]
    assert len(expected) == 4

    out = daemon.cli("events", "--since", "0", "--timeout", "1", "--filter", "topic==/test/a").stdout
    lines = out.splitlines()
    assert len(lines) == 4, out
    for line, envelope in zip(lines, expected):
        m = TEXT_LINE.fullmatch(line)
        assert m, f"not TIMESTAMP NAMESPACE TOPIC {{json}}: {line!r}"
        stamp, namespace, topic, body = m.groups()
        assert (namespace, topic) == ("default", "/test/a")
        assert json.loads(body) == envelope["event"]
        assert stamp == format_time(envelope["timestamp"])
        parsed = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
        assert abs(parsed + int(stamp[20:29]) / 1e9 - envelope["timestamp"]) < 1e-3, (stamp, envelope["timestamp"])

    # Alternatives: either filter may match.
    out = daemon.cli("events", "--since", "0", "--timeout", "1",
                     "--filter", "topic==/test/a,event.n==1", "--filter", "topic==/test/b,event.n==2").stdout
    assert [TEXT_LINE.fullmatch(line).group(3, 4) for line in out.splitlines()] == \
        [("/test/a", '{"n": 1, "name": "a1"}'), ("/test/b", '{"n": 2}')]


def test_cli_events_json_prints_one_envelope_a_line(daemon, client):
    for i in range(3):
        client.events.publish("/test/a", {"n": i})
        client.events.publish("/test/b", {"n": i})
    everything = list(client.events.replay(0))

    out = daemon.cli("events", "--since", "0", "--timeout", "1", "--format", "json").stdout
    printed = [json.loads(line) for line in out.splitlines()]
    assert printed == everything
    assert_consecutive(printed, 1)

    out = daemon.cli("events", "--since", "2", "--timeout", "1", "--format", "json",
                     "--filter", "topic==/test/b").stdout
    printed = [json.loads(line) for line in out.splitlines()]
    assert [(e["seq"], e["event"]["n"]) for e in printed] == \
        [(e["seq"], e["event"]["n"]) for e in everything if e["seq"] > 2 and e["topic"] == "/test/b"]


def test_cli_events_rejects_a_bad_filter(daemon):
    result = daemon.cli("events", "--since", "0", "--timeout", "1", "--filter", "topic===", check=False)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "filter" in result.stderr


# --- a subscriber that stops reading -------------------------------------------------------------

@pytest.mark.slow
def test_stalled_subscriber_does_not_grow_the_events_actor(daemon, client):
    events_pid = daemon.actor_pids()["events"]
    pad = "x" * 960                           # with the envelope, about 1 KiB an event

    # The actor keeps the newest events in memory for replay: fill that window first, so what is
    # measured afterwards is what the stalled subscriber costs.
    publish_pipelined(daemon.address, "/test/fill", [{"n": i, "pad": pad} for i in range(10_000)])
    baseline = rss_kib(events_pid)

    address = client.call("events", "head")["address"]
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(address)                  # and never read from
    try:
        start = client.events.head()
        count = 60_000
        fast = Subscriber(daemon, since=start, want=count, timeout=180)
        fast.start()
        wait_until(lambda: events_stats(daemon).get("subscribers", 0) >= 2, 20, what="both subscriptions")

        began = time.monotonic()
        seqs = publish_pipelined(daemon.address, "/test/big", [{"n": i, "pad": pad} for i in range(count)])
        elapsed = time.monotonic() - began
        assert seqs == list(range(start + 1, start + 1 + count))
        grown = rss_kib(events_pid) - baseline
        assert grown < 40 * MiB, f"events actor grew by {grown // MiB} MiB for one stalled subscriber"

        # The daemon keeps serving, and a subscriber that reads still gets everything.
        assert client.version()["server"]
        assert client.events.publish("/test/after", {}) == start + count + 1
        got = fast.finish(timeout=180)
        assert_consecutive(got, start + 1)
        assert [e["event"]["n"] for e in got] == list(range(count))
        assert daemon.actor_pids()["events"] == events_pid, "the events actor was restarted"
        assert elapsed < 150
    finally:
        stalled.close()


# --- metrics -------------------------------------------------------------------------------------

def test_subscriber_gauge_follows_subscribers(daemon, client):
    url = client.info()["metrics"]
    assert url, "berthd started without a metrics endpoint"
    gauge = "berth_event_subscribers"
    assert metric(url, gauge) == 0

    address = client.call("events", "head")["address"]
    sockets = []
    try:
        for n in (1, 2):
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(address)
            sockets.append(sub)
            wait_until(lambda: metric(url, gauge) == n, 10, what=f"{gauge} == {n}")

        # A subscription made by the client library counts the same way.
        reader = Subscriber(daemon, since=None, want=1, timeout=30)
        reader.start()
        wait_until(lambda: metric(url, gauge) == 3, 10, what=f"{gauge} == 3")
        client.events.publish("/test/ping", {})
        assert [e["topic"] for e in reader.finish(timeout=30)] == ["/test/ping"]
        wait_until(lambda: metric(url, gauge) == 2, 10, what=f"{gauge} back to 2")
    finally:
        for sub in sockets:
            sub.close()
    wait_until(lambda: metric(url, gauge) == 0, 10, what=f"{gauge} back to 0")
