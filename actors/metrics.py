"""berth's Prometheus metrics, shared by every actor process (prometheus-client multiprocess mode).

The supervisor sets PROMETHEUS_MULTIPROC_DIR before this module is first imported, so every
process forked from it writes its samples there and the supervisor's endpoint sums them.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("berth.metrics")

COLLECT_ATTEMPTS = 5

REQUESTS = Counter("berth_requests_total", "Requests answered, by service, method and code",
                   ["service", "method", "code"])
LATENCY = Histogram("berth_request_seconds", "Request latency seen by the router", ["service", "method"],
                    buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
RESTARTS = Counter("berth_actor_restarts_total", "Actor processes restarted after dying", ["actor"])
ACTORS_UP = Gauge("berth_actors_up", "Actors registered with the router", multiprocess_mode="livemax")
EVENTS_PUBLISHED = Counter("berth_events_published_total", "Events appended to the log and sent", ["topic"])
SUBSCRIBERS = Gauge("berth_event_subscribers", "Subscriptions open on the event bus", multiprocess_mode="livesum")


def observe_request(service: str, method: str, code: str, seconds: float) -> None:
    if code == "NotImplemented":
        method = "unknown"           # garbage method names must not grow the label set
    REQUESTS.labels(service, method, code or "OK").inc()
    LATENCY.labels(service, method).observe(seconds)


def process_died(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class MetricsServer:
    """`GET /v1/metrics` on the configured address, from a thread the supervisor owns."""

    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        self.server = make_server(host or "127.0.0.1", int(port), self._app, _Server, _QuietHandler)
        self.address = f"{host or '127.0.0.1'}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def _app(self, environ, start_response):
        if environ.get("PATH_INFO") != "/v1/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /v1/metrics\n"]
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for attempt in range(COLLECT_ATTEMPTS):
            try:
                body = generate_latest(registry)
                break
            except (OSError, ValueError, struct.error) as e:
                # an actor came or went during the scrape: a new one's file may be read before
                # it has its size (empty: struct.error), a dead one's may be gone; read again
                if attempt == COLLECT_ATTEMPTS - 1:
                    log.warning("metrics: samples' files kept changing under the scrape: %s", e)
                    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                    return [b"actors came and went during the scrape; try again\n"]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
