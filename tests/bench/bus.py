"""The bus: router round trips from 1 and 8 clients, and event fan-out to 10 subscribers."""
from __future__ import annotations

import multiprocessing
import statistics
import time

from tests.support import Daemon

ROUND_TRIPS = 5_000
CLIENTS = 8
EVENTS = 5_000
SUBSCRIBERS = 10


def _round_trips(address: str, service: str, method: str, n: int, out) -> None:
    from bus.client import Connection
    conn = Connection(address)
    for _ in range(200):
        conn.call(service, method, namespace="default")
    samples = []
    started = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        conn.call(service, method, namespace="default")
        samples.append(time.perf_counter() - t)
    out.put((samples, time.perf_counter() - started))


def _subscriber(address: str, since: int, n: int, ready, out) -> None:
    from berth.client import Client
    events = Client(address).events.subscribe(since=since - 1, timeout=120)
    next(events)                          # the warm-up event: we are subscribed
    ready.put(True)
    first = last = None
    got = 0
    for env in events:
        first = first or time.perf_counter()
        got += 1
        last = time.perf_counter()
        if got == n:
            break
    out.put((got, first, last))


def _percentile(samples: list[float], p: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(len(samples) * p))]


def run() -> None:
    mp = multiprocessing.get_context("spawn")
    d = Daemon(metrics=False).start()
    try:
        for service, method in (("berth", "version"), ("metadata", "list_namespaces")):
            for clients in (1, CLIENTS):
                out = mp.Queue()
                procs = [mp.Process(target=_round_trips, args=(d.address, service, method, ROUND_TRIPS, out))
                         for _ in range(clients)]
                for p in procs:
                    p.start()
                results = [out.get() for _ in procs]
                for p in procs:
                    p.join()
                samples = [s for r, _ in results for s in r]
                rate = sum(len(r) / elapsed for r, elapsed in results)
                print(f"round trip {service}.{method:<16} {clients} client(s): "
                      f"p50 {_percentile(samples, .5) * 1e6:7.0f} µs  p99 {_percentile(samples, .99) * 1e6:7.0f} µs  "
                      f"{rate:9.0f} req/s", flush=True)
        client = d.client()
        warmup = client.events.publish("/bench/warmup", {})
        out, ready = mp.Queue(), mp.Queue()
        subs = [mp.Process(target=_subscriber, args=(d.address, warmup, EVENTS, ready, out))
                for _ in range(SUBSCRIBERS)]
        for p in subs:
            p.start()
        for _ in subs:
            ready.get(timeout=60)
        started = time.perf_counter()
        for i in range(EVENTS):
            client.events.publish("/bench/tick", {"n": i, "pad": "x" * 100})
        published = time.perf_counter() - started
        results = [out.get(timeout=120) for _ in subs]
        for p in subs:
            p.join()
        delivered = sum(r[0] for r in results)
        spread = max(r[2] for r in results) - started
        print(f"events: {EVENTS} published in {published:.2f}s ({EVENTS / published:.0f}/s acknowledged); "
              f"{SUBSCRIBERS} subscribers got {delivered}/{EVENTS * SUBSCRIBERS} "
              f"({delivered / spread:.0f} deliveries/s, last one {statistics.mean(r[2] - started for r in results):.2f}s after the start)",
              flush=True)
    finally:
        d.cleanup()
