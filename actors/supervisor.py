"""berthd: the supervisor and request router.

It forks the template before it opens any socket, starts every actor at once (a call to one not
registered yet waits in the router's queue for it, so `requires` orders nothing), routes
requests to them, pings them, restarts the dead with exponential backoff, and tells systemd how
things stand (READY=1 once every actor answers, WATCHDOG=1 while all are healthy, STOPPING=1).
Signals become events on its loop through a wakeup pipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
PING_EVERY = 1.0
HEALTHY_WITHIN = 3.0            # an actor that has not answered a ping for this long is unhealthy
STABLE_AFTER = 10.0             # an actor up this long has its restart backoff reset
STOP_GRACE = 10.0
HOUSEKEEPING_EVERY = 0.02       # deadlines, restarts, pings and health: not on every message

log = logging.getLogger("berth.supervisor")


@dataclasses.dataclass
class ActorState:
    name: str
    requires: tuple[str, ...]
    pid: int | None = None
    status: str = "stopped"         # stopped -> starting -> running -> (exited -> backoff) -> starting
    restarts: int = 0
    renewals: int = 0               # exits it asked for, to start afresh (EXIT_RENEW): no backoff
    attempt: int = 0                # consecutive failures, for backoff
    started_at: float = 0.0
    restart_at: float | None = None
    last_pong: float = 0.0
    stats: dict = dataclasses.field(default_factory=dict)

    def describe(self, now: float) -> dict:
        return {"name": self.name, "requires": list(self.requires), "pid": self.pid, "status": self.status,
                "restarts": self.restarts, "renewals": self.renewals,
                "uptime": round(now - self.started_at, 3) if self.pid else 0,
                "stats": self.stats}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="berthd", description="berth daemon: supervisor of berth's actors")
    p.add_argument("--config", help="TOML config file (default /etc/berth/config.toml if present)")
    p.add_argument("--root", help="persistent data directory (default /var/lib/berth)")
    p.add_argument("--state", help="runtime state directory (default /run/berth)")
    p.add_argument("--address", help="client socket (default <state>/berth.sock)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--metrics-address", help="host:port for /v1/metrics; empty disables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from actors.config import Config
    from bus import failpoints
    from bus.errors import BerthError
    try:
        config = Config.load(args.config, root=args.root, state=args.state, address=args.address,
                             log_level=args.log_level, metrics_address=args.metrics_address)
        armed = failpoints.parse(config.failpoints) | failpoints.parse(os.environ.get("BERTH_FAILPOINTS", ""))
    except BerthError as e:
        print(f"berthd: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    for path in (config.root, config.state):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    locks = [_lock_dir(config.state, "state"), _lock_dir(config.root, "root")]
    if None in locks:
        return 1
    # Metrics files must be per daemon and fresh; the env var must be set before any import of
    # prometheus_client, and before the template is forked, so every actor inherits it.
    shutil.rmtree(config.metrics_dir, ignore_errors=True)
    os.makedirs(config.metrics_dir, mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = config.metrics_dir
    # Failpoints too: every process forked from here on shares the one table.
    failpoints.share(os.path.join(config.state, "failpoints.lock"), armed)
    if armed:
        log.warning("failpoints set: %s", ";".join(f"{k}={v}" for k, v in armed.items()))
    from actors.template import Template, preload
    preload()
    template = Template.fork(config, keep_out=[f.fileno() for f in locks])
    return Supervisor(config, template, locks).run()


def _lock_dir(directory: str, what: str):
    """One berthd per state and per root directory; the lock file names the holder."""
    path = os.path.join(directory, "berthd.lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        print(f"berthd: another berthd (pid {holder}) is using {what} directory {directory}; "
              f"give this one its own --{what}", file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class Supervisor:
    def __init__(self, config, template, locks):
        import sdnotify
        import zmq
        from setproctitle import setproctitle

        from actors import metrics
        from actors.registry import start_order
        from bus.router import Router
        from bus.client import zmq_address

        setproctitle("berthd")
        self.config = config
        self.template = template
        self.locks = locks
        self.metrics = metrics
        self.notifier = sdnotify.SystemdNotifier()
        self.actors = {s.name: ActorState(s.name, s.requires) for s in start_order()}
        self.ctx = zmq.Context()
        for sock in ("berth.sock", "actors.sock"):
            _unlink(os.path.join(config.state, sock))
        _unlink(config.address)
        self.router = Router(self.ctx, zmq_address(config.address), config.actors_address,
                             set(self.actors), self.builtin, observe=metrics.observe_request,
                             on_register=self.on_register, on_pong=self.on_pong)
        os.chmod(config.address, 0o600)
        self.metrics_server = None
        if config.metrics_address:
            self.metrics_server = metrics.MetricsServer(config.metrics_address)
        self.ready = False
        self.stopping = False
        self.exit_code = 0
        self.stop_deadline = 0.0
        watchdog = os.environ.get("WATCHDOG_USEC")
        self.watchdog_every = int(watchdog) / 2e6 if watchdog and watchdog.isdigit() else None
        self.next_watchdog = 0.0
        self.next_ping = 0.0
        self.next_housekeeping = 0.0

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        import zmq
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        poller = zmq.Poller()
        poller.register(self.router.front, zmq.POLLIN)
        poller.register(self.router.back, zmq.POLLIN)
        poller.register(self.template.fileno(), zmq.POLLIN)
        poller.register(sig_r, zmq.POLLIN)
        log.info("berthd %s starting: root %s, state %s, address %s", self._version(),
                 self.config.root, self.config.state, self.config.address)
        self._notify("STATUS=starting actors")
        self._start_actors()
        while True:
            for item, _ in poller.poll(100):
                if item is self.router.front:
                    if not self.stopping:
                        self.router.on_front()
                elif item is self.router.back:
                    self.router.on_back()
                elif item == sig_r:
                    self._on_signals(os.read(sig_r, 64))
                else:
                    self._on_template(self.template.messages())
            now = time.monotonic()
            if self.stopping:
                if not any(a.pid for a in self.actors.values()) or now > self.stop_deadline:
                    break
                continue
            if now < self.next_housekeeping:
                continue
            self.next_housekeeping = now + HOUSEKEEPING_EVERY
            self.router.expire()
            self._restart_due(now)
            if now >= self.next_ping:
                self.next_ping = now + PING_EVERY
                for name in self.router.up:
                    self.router.ping(name)
            self._report_health(now)
        return self._shutdown()

    def _on_signals(self, data: bytes) -> None:
        if any(b in (signal.SIGTERM, signal.SIGINT) for b in data) and not self.stopping:
            log.info("stopping")
            self.stopping = True
            self.stop_deadline = time.monotonic() + STOP_GRACE
            self._notify("STOPPING=1")
            for a in self.actors.values():
                if a.pid:
                    _kill(a.pid, signal.SIGTERM)

    def _on_template(self, messages: list[dict]) -> None:
        for msg in messages:
            op = msg.get("op")
            if op == "started":
                a = self.actors[msg["name"]]
                a.pid, a.started_at = msg["pid"], time.monotonic()
                # Under load the actor's own registration can arrive before the template's word
                # that it started: it is running then, and must not go back to "starting".
                if self.router.up.get(a.name) != msg["pid"]:
                    a.status = "starting"
            elif op == "exited":
                self._on_exit(self.actors[msg["name"]], msg["pid"], msg["status"])
            elif op == "gone":
                log.critical("the template process died; berthd cannot start actors any more")
                self.exit_code = 1
                self.stopping = True
                self.stop_deadline = time.monotonic()
                self._notify("STOPPING=1\nSTATUS=template process died")

    def _on_exit(self, a: ActorState, pid: int, status: int) -> None:
        from actors.template import EXIT_RENEW
        self.router.actor_down(a.name)
        self.metrics.process_died(pid)
        self.metrics.ACTORS_UP.set(len(self.router.up))
        a.pid, a.last_pong = None, 0.0
        if self.stopping:
            a.status = "stopped"
            return
        if status == EXIT_RENEW:
            log.info("actor %s (pid %d) exited to start afresh", a.name, pid)
            a.renewals += 1
            a.status = "starting"
            self.template.spawn(a.name)
            return
        now = time.monotonic()
        a.attempt = 1 if now - a.started_at > STABLE_AFTER else a.attempt + 1
        delay = _backoff(a.attempt)
        a.status, a.restart_at = "backoff", now + delay
        log.warning("actor %s (pid %d) exited with status %d; restarting in %.2fs", a.name, pid, status, delay)

    def _restart_due(self, now: float) -> None:
        for a in self.actors.values():
            if a.status == "backoff" and a.restart_at <= now:
                a.restarts += 1
                a.status = "starting"
                self.metrics.RESTARTS.labels(a.name).inc()
                self.template.spawn(a.name)

    def _start_actors(self) -> None:
        from actors.registry import spawn_order
        for spec in spawn_order():
            a = self.actors[spec.name]
            if a.status == "stopped":
                a.status = "starting"
                self.template.spawn(a.name)

    def on_register(self, name: str, pid: int) -> None:
        a = self.actors[name]
        a.status = "running"
        self.metrics.ACTORS_UP.set(len(self.router.up))
        log.debug("actor %s registered (pid %d)", name, pid)
        self.router.ping(name)

    def on_pong(self, name: str, stats: dict) -> None:
        a = self.actors.get(name)
        if a is not None:
            a.last_pong, a.stats = time.monotonic(), stats

    def _healthy(self, now: float) -> bool:
        return all(a.status == "running" and now - a.last_pong < HEALTHY_WITHIN for a in self.actors.values())

    def _report_health(self, now: float) -> None:
        healthy = self._healthy(now)
        if healthy and not self.ready:
            self.ready = True
            log.info("berthd ready: %d actors answering on %s", len(self.actors), self.config.address)
            self._notify(f"READY=1\nSTATUS=running: {len(self.actors)} actors\nMAINPID={os.getpid()}")
        if self.watchdog_every and healthy and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_every
            self._notify("WATCHDOG=1")

    def _notify(self, state: str) -> None:
        self.notifier.notify(state)

    def _shutdown(self) -> int:
        for a in self.actors.values():
            if a.pid:
                log.warning("actor %s (pid %d) did not stop in time; killing it", a.name, a.pid)
                _kill(a.pid, signal.SIGKILL)
        if self.exit_code == 0:
            self.template.quit()
        if self.metrics_server:
            self.metrics_server.close()
        self.router.close()
        self.ctx.term()
        _unlink(self.config.address)
        _unlink(os.path.join(self.config.state, "actors.sock"))
        for lock in self.locks:
            lock.close()
        log.info("stopped")
        return self.exit_code

    # --- the built-in "berth" service ----------------------------------------------------

    def builtin(self, req):
        from bus.errors import NotImplementedErr
        now = time.monotonic()
        if req.method == "version":
            return {"version": self._version(), "pid": os.getpid()}
        if req.method == "info":
            return {"version": self._version(), "pid": os.getpid(), "root": self.config.root,
                    "state": self.config.state, "address": self.config.address,
                    "events": self.config.events_address, "ready": self.ready,
                    "metrics": self.metrics_server and f"http://{self.metrics_server.address}/v1/metrics"}
        if req.method == "actors":
            return {"router": self.router.stats(), "actors": [a.describe(now) for a in self.actors.values()]}
        from bus import failpoints
        if req.method in failpoints.METHODS:
            return failpoints.serve(req.method, req.args)
        raise NotImplementedErr(f"berth has no method {req.method!r}")

    @staticmethod
    def _version() -> str:
        from berth.version import VERSION
        return VERSION


def _backoff(attempt: int) -> float:
    """Exponential backoff from tenacity: 0.1 s, 0.2 s, 0.4 s … at most 10 s."""
    import tenacity
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return tenacity.wait_exponential(multiplier=0.1, max=10)(state)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    sys.exit(main())
