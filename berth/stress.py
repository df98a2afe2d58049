"""`berth-stress`: load berthd the way containerd-stress loads containerd, and measure it.

    berth-stress -c 8 -d 30s --image REF          8 workers, each looping create container ->
                                                  create task -> start -> wait -> delete task ->
                                                  delete container, for 30 seconds
    berth-stress density --count 20 --image REF   20 sleeping containers; the PSS and RSS of their shims

The first reports runs, failures (with the first few messages), containers per second and latency
percentiles, of a whole run and of each phase: create (the container, its snapshot and its task),
start, wait (until the process has exited), delete (the task, then the container and its
snapshot). A run whose command exits non-zero is a failure. At the deadline no new run begins and
those under way finish. The image is pulled first when the namespace does not have it.

Everything made carries the label `berth.stress=<token>`, one token per invocation, so a sweep at
the end removes exactly what this invocation left (a failed run's remains, or all of it after
SIGINT or SIGTERM, which kill the tasks in flight first) and never another invocation's. A second
signal gives up on the cleanup; the label tells what to remove by hand.

Module imports are kept to the standard library, as in berth.cli: the client comes in when used.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time

LABEL = "berth.stress"
DEFAULT_IMAGE = "docker.io/library/busybox:latest"
DEFAULT_NAMESPACE = "stress"       # containerd-stress's: apart from everyone's own containers
PHASES = ("create", "start", "wait", "delete")
PERCENTILES = (50, 95, 99)
ERRORS_KEPT = 5                    # failure messages reported; the count covers them all
DENSITY_COMMAND = ("sleep", "3600")
RUNNING_TIMEOUT = 60.0             # seconds for the density containers to be seen running
POLL = 0.1                         # seconds between the supervising thread's looks at its workers

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SecondSignal(Exception):
    """A signal came while the first one's cleanup was running: leave at once."""


# --- pure logic ---------------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """Seconds from `10s`, `1m30s`, `500ms`, `2h` or plain seconds (`45`, `2.5`), as Go's
    time.ParseDuration reads the flags of containerd-stress."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 10s, 1m30s, 500ms, 45)") from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"duration must be more than zero, not {text!r}")
    return seconds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def percentile(ordered: list[float], q: float) -> float | None:
    """The q-th percentile of sorted values, interpolating between the two nearest ranks."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_ms(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {f"p{q}": None if (v := percentile(ordered, q)) is None else round(v * 1000, 3) for q in PERCENTILES}


class Tally:
    """What the workers measured, added to under one lock: the phase times of the runs that
    succeeded, the failures with their first few messages, and the runs cut short by a signal
    (neither: the tool itself ended them)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.samples: dict[str, list[float]] = {name: [] for name in ("run", *PHASES)}
        self.succeeded = 0
        self.failures = 0
        self.aborted = 0
        self.errors: list[str] = []

    def success(self, phases: dict[str, float]) -> None:
        with self.lock:
            self.succeeded += 1
            self.samples["run"].append(sum(phases.values()))
            for name, seconds in phases.items():
                self.samples[name].append(seconds)

    def failure(self, message: str) -> None:
        with self.lock:
            self.failures += 1
            if len(self.errors) < ERRORS_KEPT:
                self.errors.append(message)

    def abort(self) -> None:
        with self.lock:
            self.aborted += 1

    def report(self, elapsed: float) -> dict:
        with self.lock:
            return {"runs": self.succeeded + self.failures, "succeeded": self.succeeded,
                    "failures": self.failures, "aborted": self.aborted, "errors": list(self.errors),
                    "elapsed": round(elapsed, 3),
                    "containers_per_second": round(self.succeeded / elapsed, 3) if elapsed > 0 else 0.0,
                    "latency_ms": {name: latency_ms(values) for name, values in self.samples.items()}}


def shim_memory_kib(pid: int) -> dict:
    """{"pss_kib", "rss_kib"} of one process, from /proc/<pid>/smaps_rollup (summed by the kernel)."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                found[key.lower() + "_kib"] = int(rest.split()[0])
    return found


# --- one invocation's containers ----------------------------------------------------------------

class Session:
    """One invocation: its token (the value of every label it puts), the tasks in flight (for a
    signal to kill), the stop flag its threads watch, and the sweep that removes what it made.

    Signal handlers only note the signal; the main thread, which supervises, acts on it."""

    def __init__(self, client):
        import uuid
        self.client = client
        self.token = uuid.uuid4().hex[:12]
        self.stop = threading.Event()
        self.signal = 0
        self.lock = threading.Lock()
        self.in_flight: dict[str, object] = {}
        self.killed: set[str] = set()
        self.started = False               # set before the first container is made: a sweep is due

    @property
    def labels(self) -> dict:
        return {LABEL: self.token}

    def track(self, cid: str, task) -> None:
        with self.lock:
            self.in_flight[cid] = task

    def untrack(self, cid: str) -> None:
        with self.lock:
            self.in_flight.pop(cid, None)

    @contextlib.contextmanager
    def signals(self):
        def note(signum, frame):
            if self.signal:
                raise SecondSignal(signum)
            self.signal = signum
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def supervise(self, threads: list["Owned"], deadline: float | None = None) -> None:
        """Wait in the main thread (where signals land) for the threads to end: at `deadline`
        tell them to stop; on a signal, tell them too and kill the tasks they have running."""
        while alive := [t for t in threads if t.is_alive()]:
            if self.signal or (deadline is not None and time.monotonic() >= deadline):
                self.stop.set()
            if self.signal:
                self._kill_in_flight()
            alive[0].join(POLL)

    def _kill_in_flight(self) -> None:
        from bus.errors import BerthError
        with self.lock:
            fresh = [(cid, task) for cid, task in self.in_flight.items() if cid not in self.killed]
            self.killed.update(cid for cid, _ in fresh)
        for _, task in fresh:
            with contextlib.suppress(BerthError):
                task.kill(signal.SIGKILL, all=True)

    def sweep(self) -> list[str]:
        """Remove every container with this session's label, and its task; what could not be
        removed, as messages."""
        from berth.client import Container
        from berth.cli.run import discard
        from bus.errors import BerthError, NotFound
        if not self.started:
            return []
        client = self.client
        problems = []
        try:
            left = client.containers.list([f'labels."{LABEL}"=={self.token}'])
            running = {t["container_id"] for t in client.tasks.list() if t.get("status") != "stopped"}
        except BerthError as e:
            return [f"listing what is left: {e}"]
        for record in left:                  # kill them all first: their exits overlap
            if record["id"] in running:
                with contextlib.suppress(BerthError):
                    client.tasks.get(record["id"]).kill(signal.SIGKILL, all=True)
        for record in left:
            try:
                with contextlib.suppress(NotFound):
                    discard(client.tasks.get(record["id"]))
                with contextlib.suppress(NotFound):
                    Container(client, record).delete(snapshot=True, check_task=False)
            except BerthError as e:
                problems.append(f"{record['id']}: {e}")
        return problems


class Owned(threading.Thread):
    """A thread whose owner collects its result or its exception: no work is fire-and-forget.
    Daemonic, so a second signal's exit is not held up by a call still waiting for berthd."""

    def __init__(self, name: str, fn, *args):
        super().__init__(name=name, daemon=True)
        self.fn, self.args = fn, args
        self.result = self.error = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:
            self.error = e

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


# --- the stress run -----------------------------------------------------------------------------

def ensure_image(client, ref: str, plain_http: bool, snapshotter: str) -> tuple[dict, bool]:
    """The image record, pulled (and unpacked for `snapshotter`) if the namespace lacks it; and
    whether it was pulled."""
    from bus.errors import BerthError, NotFound
    try:
        return client.images.get(ref), False
    except NotFound:
        pass
    print(f"berth-stress: pulling {ref}", file=sys.stderr)
    try:
        return client.pull(ref, plain_http=plain_http, snapshotter=snapshotter), True
    except BerthError as e:
        raise type(e)(f"cannot pull {ref}: {e}") from None


def run_once(session: Session, tally: Tally, cid: str, image: dict, options) -> None:
    """One container's whole life, timed by phase; whatever goes wrong, its remains removed."""
    from berth.cli.run import discard
    from bus.errors import BerthError
    client = session.client
    phases = {}
    container = task = None
    clock = time.perf_counter
    try:
        t = clock()
        container = client.containers.new(cid, image, args=options.command, snapshotter=options.snapshotter,
                                          runtime=options.runtime, labels=session.labels)
        task = container.new_task()
        session.track(cid, task)
        phases["create"], t = clock() - t, clock()
        task.start()
        phases["start"], t = clock() - t, clock()
        status = task.wait()
        phases["wait"], t = clock() - t, clock()
        task.delete()
        session.untrack(cid)
        task = None
        container.delete(snapshot=True, check_task=False)
        container = None
        phases["delete"] = clock() - t
    except BerthError as e:
        if session.signal:
            tally.abort()
        else:
            tally.failure(f"{cid}: {e}")
        if task is not None:
            with contextlib.suppress(BerthError):
                discard(task)
            session.untrack(cid)
        if container is not None:
            with contextlib.suppress(BerthError):
                container.delete(snapshot=True, check_task=False)
        return
    if status == 0:
        tally.success(phases)
    elif session.signal:
        tally.abort()
    else:
        tally.failure(f"{cid}: {shlex.join(options.command)} exited with status {status}")


def work(session: Session, tally: Tally, index: int, image: dict, options) -> None:
    n = 0
    try:
        while not session.stop.is_set():
            n += 1
            run_once(session, tally, f"stress-{session.token}-{index}-{n}", image, options)
    finally:
        session.client.close()                  # this thread's connection


def stress(session: Session, options) -> tuple[dict, int]:
    image, pulled = ensure_image(session.client, options.image, options.plain_http, options.snapshotter)
    tally = Tally()
    threads = [Owned(f"worker-{i}", work, session, tally, i, image, options) for i in range(options.concurrent)]
    session.started = True
    started = time.monotonic()
    for t in threads:
        t.start()
    session.supervise(threads, deadline=started + options.duration)
    elapsed = time.monotonic() - started
    for t in threads:
        t.outcome()
    report = {"namespace": session.client.namespace, "image": image["name"], "image_pulled": pulled,
              "runtime": options.runtime, "snapshotter": options.snapshotter, "command": options.command,
              "concurrency": options.concurrent, "duration": options.duration, **tally.report(elapsed)}
    return report, (1 if report["failures"] else 0)


def print_stress(report: dict) -> None:
    workers = f"{report['concurrency']} worker" + ("s" if report["concurrency"] > 1 else "")
    print(f"{report['runs']} runs in {report['elapsed']:.2f}s with {workers}: "
          f"{report['containers_per_second']:.2f} containers/s, {report['failures']} failures"
          + (f", {report['aborted']} cut short" if report["aborted"] else ""))
    print(f"image {report['image']}, runtime {report['runtime']}, snapshotter {report['snapshotter']}, "
          f"command {shlex.join(report['command'])}")
    print(f"{'latency (ms)':<14}" + "".join(f"{f'p{q}':>10}" for q in PERCENTILES))
    for name, values in report["latency_ms"].items():
        cells = ("-" if v is None else f"{v:.1f}" for v in values.values())
        print(f"  {name:<12}" + "".join(f"{c:>10}" for c in cells))
    if report["errors"]:
        print("first errors:")
        for message in report["errors"]:
            print(f"  {message}")


# --- density ------------------------------------------------------------------------------------

def start_sleepers(session: Session, image: dict, options) -> list[dict] | None:
    """`count` containers running DENSITY_COMMAND, then the memory of their shims once all run;
    None if told to stop first."""
    from bus.errors import FailedPrecondition
    client = session.client
    ids = []
    try:
        for i in range(options.count):
            if session.stop.is_set():
                return None
            cid = f"density-{session.token}-{i}"
            container = client.containers.new(cid, image, args=list(DENSITY_COMMAND),
                                              snapshotter=options.snapshotter, runtime=options.runtime,
                                              labels=session.labels)
            container.new_task().start()
            ids.append(cid)
        tasks = wait_running(session, ids)
        if tasks is None:
            return None
        shims = []
        for cid in ids:
            pid = tasks[cid].get("shim_pid") or 0
            try:
                memory = shim_memory_kib(pid)
            except OSError as e:
                raise FailedPrecondition(f"cannot read the memory of {cid}'s shim (pid {pid}): {e.strerror}; "
                                         "density must run on berthd's host, as root") from None
            shims.append({"id": cid, "pid": pid, **memory})
    finally:
        client.close()
    return shims


def wait_running(session: Session, ids: list[str]) -> dict | None:
    """The tasks of `ids` once every one is running, by container id; None if told to stop first."""
    from bus.errors import FailedPrecondition
    deadline = time.monotonic() + RUNNING_TIMEOUT
    while not session.stop.is_set():
        tasks = {t["container_id"]: t for t in session.client.tasks.list() if t["container_id"] in ids}
        if len(tasks) == len(ids) and all(t["status"] == "running" for t in tasks.values()):
            return tasks
        if time.monotonic() > deadline:
            waiting = sorted(cid for cid in ids if tasks.get(cid, {}).get("status") != "running")
            raise FailedPrecondition(f"not running after {RUNNING_TIMEOUT:.0f}s: {', '.join(waiting)}")
        session.stop.wait(POLL)
    return None


def density(session: Session, options) -> tuple[dict | None, int]:
    image, pulled = ensure_image(session.client, options.image, options.plain_http, options.snapshotter)
    worker = Owned("density", start_sleepers, session, image, options)
    session.started = True
    worker.start()
    session.supervise([worker])
    shims = worker.outcome()
    if shims is None:                      # interrupted: nothing worth reporting
        return None, 0
    count = len(shims)
    pss, rss = sum(s["pss_kib"] for s in shims), sum(s["rss_kib"] for s in shims)
    report = {"namespace": session.client.namespace, "image": image["name"], "image_pulled": pulled,
              "runtime": options.runtime, "snapshotter": options.snapshotter, "count": count,
              "pss_kib": pss, "rss_kib": rss,
              "pss_per_shim_kib": pss // count if count else 0, "rss_per_shim_kib": rss // count if count else 0,
              "shims": shims}
    return report, 0


def print_density(report: dict) -> None:
    print(f"{report['count']} shims, image {report['image']}, runtime {report['runtime']}")
    print(f"{'':<6}{'total KiB':>12}{'per shim KiB':>15}")
    print(f"{'PSS':<6}{report['pss_kib']:>12}{report['pss_per_shim_kib']:>15}")
    print(f"{'RSS':<6}{report['rss_kib']:>12}{report['rss_per_shim_kib']:>15}")


# --- command line -------------------------------------------------------------------------------

def add_connection_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Options both modes take. On the subcommand their defaults are suppressed, so that given
    before it (`berth-stress -a SOCK density`) they are not reset by its parser."""
    def default(value):
        return argparse.SUPPRESS if suppress else value
    p.add_argument("-a", "--address", default=default(os.environ.get("BERTH_ADDRESS", "/run/berth/berth.sock")),
                   help="berthd's socket (env BERTH_ADDRESS; default /run/berth/berth.sock)")
    p.add_argument("-n", "--namespace", default=default(DEFAULT_NAMESPACE),
                   help=f"namespace to work in (default {DEFAULT_NAMESPACE})")
    p.add_argument("--image", default=default(DEFAULT_IMAGE), help=f"image to run (default {DEFAULT_IMAGE})")
    p.add_argument("--plain-http", action="store_true", default=default(False),
                   help="pull over HTTP, not HTTPS (a local registry)")
    p.add_argument("--runtime", default=default("runc"), help="runc or crun (default runc)")
    p.add_argument("--snapshotter", default=default(os.environ.get("BERTH_SNAPSHOTTER", "overlayfs")),
                   help="snapshotter for the root filesystems (env BERTH_SNAPSHOTTER; default overlayfs)")
    p.add_argument("--json", action="store_true", default=default(False), help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth-stress", usage="%(prog)s [OPTIONS] [-c N] [-d DURATION] [--command CMD]\n"
                                "       %(prog)s [OPTIONS] density [--count N]", description="Stress test a berthd: concurrent container "
                                "runs for a while, or (density) the memory of many running shims.")
    add_connection_options(p, suppress=False)
    p.add_argument("-c", "--concurrent", type=positive_int, default=1, metavar="N",
                   help="workers running containers at once (default 1)")
    p.add_argument("-d", "--duration", type=parse_duration, default=60.0, metavar="DURATION",
                   help="how long to run: 10s, 1m, 1m30s, or seconds (default 1m)")
    p.add_argument("--command", type=shlex.split, default=["true"], metavar="CMD",
                   help="what each container runs, a short-lived command (default: true)")
    sub = p.add_subparsers(dest="mode", metavar="MODE")
    d = sub.add_parser("density", help="start N long-running containers and measure their shims' memory")
    add_connection_options(d, suppress=True)
    d.add_argument("--count", type=positive_int, default=10, metavar="N", help="containers to run (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not options.command:
        build_parser().error("--command is empty")
    from berth.client import Client
    from bus.errors import BerthError
    session = Session(Client(options.address, options.namespace, timeout=60))
    measure, show = (density, print_density) if options.mode == "density" else (stress, print_stress)
    report, code, error = None, 1, None
    try:
        with session.signals():
            try:
                report, code = measure(session, options)
            except BerthError as e:
                error = e
            except SecondSignal:
                raise
            except BaseException:
                session.sweep()
                raise
            problems = session.sweep()
    except SecondSignal:
        print(f"berth-stress: interrupted again: cleanup abandoned; remove what carries the label "
              f"{LABEL}={session.token}", file=sys.stderr)
        return 128 + session.signal
    finally:
        session.client.close()
    for problem in problems:
        print(f"berth-stress: not removed: {problem}", file=sys.stderr)
    if error is not None:
        print(f"berth-stress: {error}", file=sys.stderr)
        return 128 + session.signal if session.signal else 1
    if session.signal:
        name = signal.Signals(session.signal).name
        removed = "" if problems else "; what it had started is removed"
        print(f"berth-stress: interrupted by {name}{removed}", file=sys.stderr)
        if report is not None:
            report["interrupted"] = name
    if report is not None and options.json:
        print(json.dumps(report))
    elif report is not None:
        show(report)
    if session.signal:
        return 128 + session.signal
    return 1 if problems else code


if __name__ == "__main__":
    sys.exit(main())
