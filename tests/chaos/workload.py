"""What the chaos runs: containers from several clients, execs, subscribers, pulls.

Every run and exec is driven to its end through whatever the killer does, and never twice. The
drivers look before they act: each step first asks berthd how far the container or exec got (its
record, its task and the task's status, the exec in the task's state) and does only the next
thing, so a step cut off by a kill is simply taken again. A client never deletes a task before it
has its exit status, so a task that is not there was never created -- except after a cut-off
`berth run --rm`, which may have taken the task all the way to its deletion before it failed: then
the exit is looked up in the event log, once every event published by then has been delivered.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import threading
import time

from berth.client import Client, Process, Task
from bus.errors import AlreadyExists, BerthError, DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from tests.support import REPO, wait_until

RUN_DEADLINE = 300.0      # seconds one run or exec may take, its retries and a daemon restart included
WAIT_SLICE = 20.0         # one wait for an exit, before the task's state is looked at again
NEW_GRACE = 30.0          # a task still "new" after this long will never be created: no create is under way
CLI_SHARE = 0.25          # the share of runs made by the `berth` CLI rather than the library
CLI_TIMEOUT = 240.0
CALL_TIMEOUT = 30.0
SPOOL_DRAIN = 60.0        # how long delivering the events already published may take
EXIT = "/tasks/exit"
MAX_STATUS = 126          # exit statuses 0..125: above are the shell's "not found" and signals
KILLED = 137              # 128 + SIGKILL: how the long-running containers end


class Retry(Exception):
    """A state the driver cannot act on yet (a task being created or deleted): look again."""


class Wedged(Exception):
    """A state no client can take a container out of: reported, not retried."""


@dataclasses.dataclass
class Outcome:
    """One run (exec_id "") or exec, and how it went."""
    container_id: str
    exec_id: str
    expected: int
    via: str                                # library, cli, exec or long
    status: int | None = None
    done: bool = False
    retries: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    cli_crash: str = ""                     # a traceback the CLI printed instead of an error line
    took: float = 0.0
    ended: bool = False                     # its client has moved on: done, or given up

    @property
    def key(self) -> tuple[str, str]:
        """As its exit event names it: (container_id, id), id being the exec's id or the container's."""
        return self.container_id, self.exec_id or self.container_id

    def describe(self) -> str:
        what = f"exec {self.exec_id} in {self.container_id}" if self.exec_id else f"run {self.container_id}"
        return f"{what} ({self.via})"

    def end(self, started: float) -> None:
        self.took, self.ended = time.monotonic() - started, True

    def note(self, error: BaseException | str) -> None:
        self.retries += 1
        if len(self.errors) < 20:
            self.errors.append(error if isinstance(error, str) else f"{type(error).__name__}: {error}")


def persist(client: Client, outcome: Outcome, step, deadline: float) -> None:
    """Take `step` until it completes or the deadline passes. A transport error (berthd or an
    actor gone) gets a fresh connection; anything else is noted and the state looked at again."""
    backoff = 0.05
    while True:
        try:
            step()
            outcome.done = True
            return
        except (Unavailable, DeadlineExceeded) as e:
            client.close()
            outcome.note(e)
        except (BerthError, Retry) as e:
            outcome.note(e)
        except Wedged as e:
            outcome.note(e)
            return
        if time.monotonic() > deadline:
            return
        time.sleep(backoff)                 # a retry's backoff, not a wait for some state
        backoff = min(backoff * 2, 1.0)


class Spools:
    """The event spools of one berthd (its actors' and its shims'): once they have been empty,
    every event published before is in the log."""

    def __init__(self, root: str, state: str, ns: str):
        self.daemon_spools = os.path.join(root, "spool")
        self.task_dir = os.path.join(state, "tasks", ns)

    def pending(self) -> bool:
        # Shims first: a shim's leftovers are copied to the runtime's spool before they leave its own.
        dirs = [os.path.join(self.task_dir, t, "spool") for t in _listdir(self.task_dir)]
        dirs += [os.path.join(self.daemon_spools, a) for a in _listdir(self.daemon_spools)]
        return any(not n.startswith(".") for d in dirs for n in _listdir(d))

    def recorded_exit(self, client: Client, since: int, container_id: str) -> int | None:
        """The exit status the log holds for the container's init, once what was spooled is delivered."""
        try:
            wait_until(lambda: not self.pending(), SPOOL_DRAIN, 0.05, "the event spools to drain")
        except AssertionError as e:
            raise Retry(str(e)) from None
        for envelope in client.events.replay(since, [f"topic=={EXIT},event.container_id=={container_id}"]):
            if envelope["event"].get("id") == container_id:
                return envelope["event"]["exit_status"]
        return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


class RunDriver:
    """One container from wherever it is to run, exited and removed (`run --rm`)."""

    def __init__(self, client: Client, image: str, outcome: Outcome, args: list[str],
                 spools: Spools | None = None, since: int = 0):
        self.client, self.image, self.outcome, self.args = client, image, outcome, args
        self.spools, self.since = spools, since
        self.maybe_ran = False      # a cut-off CLI run: the task may have run and been deleted
        self.new_since: float | None = None

    @property
    def id(self) -> str:
        return self.outcome.container_id

    def step(self) -> None:
        if self.outcome.status is None:
            self.outcome.status = self._exit_status()
        self._remove()

    def _exit_status(self) -> int:
        state = self._state()
        if state is None:
            if self.maybe_ran:
                status = self.spools.recorded_exit(self.client, self.since, self.id)
                if status is not None:
                    return status
            self._create()
            state = self._state()
            if state is None:
                raise Retry(f"task {self.id} is not visible yet")
        task = Task(self.client, self.id)
        if state["status"] == "created":
            with contextlib.suppress(FailedPrecondition):     # a start redelivered finds it started
                task.start()
        elif state["status"] == "new":
            # Its shim is up, its container not created: a create is under way, or the one that
            # spawned the shim was cut off and nothing will create it (nor can it be deleted).
            self.new_since = self.new_since or time.monotonic()
            if time.monotonic() - self.new_since > NEW_GRACE:
                raise Wedged(f"task {self.id} has been new for {NEW_GRACE:.0f}s: its container is never "
                             "created, and a task that is new can be neither created again nor deleted")
            raise Retry(f"task {self.id} is new")
        elif state["status"] not in ("running", "stopped"):
            raise Retry(f"task {self.id} is {state['status']}")
        return task.wait(timeout=WAIT_SLICE)

    def _state(self) -> dict | None:
        try:
            return self.client.tasks.state(self.id)
        except NotFound:
            return None

    def _create(self) -> None:
        container = self._container()
        with contextlib.suppress(AlreadyExists):             # being created by an earlier attempt
            container.new_task()

    def _container(self):
        try:
            return self.client.containers.load(self.id)
        except NotFound:
            pass
        try:
            return self.client.containers.new(self.id, self.image, args=self.args)
        except AlreadyExists:
            try:
                return self.client.containers.load(self.id)
            except NotFound:
                with contextlib.suppress(NotFound):
                    self.client.snapshots.remove(self.id)
                raise Retry(f"snapshot {self.id} was left by an attempt that made no record") from None

    def _remove(self) -> None:
        try:
            Task(self.client, self.id).delete()
        except NotFound:
            pass
        except FailedPrecondition as e:                     # being deleted by a redelivered request
            raise Retry(str(e)) from None
        try:
            self.client.containers.load(self.id).delete(snapshot=True)
        except NotFound:
            pass


class ExecDriver:
    """One exec into a running container, from wherever it is to exited and deleted."""

    def __init__(self, client: Client, outcome: Outcome, args: list[str]):
        self.client, self.outcome, self.args = client, outcome, args

    def step(self) -> None:
        o = self.outcome
        proc = Process(self.client, o.container_id, o.exec_id)
        if o.status is None:
            o.status = self._exit_status(proc)
        with contextlib.suppress(NotFound):
            proc.delete()

    def _exit_status(self, proc: Process) -> int:
        o = self.outcome
        state = (self.client.tasks.state(o.container_id).get("execs") or {}).get(o.exec_id)
        if state is None:
            with contextlib.suppress(AlreadyExists):         # a redelivered exec
                Task(self.client, o.container_id).exec(o.exec_id, self.args)
            state = {"status": "created"}
        if state["status"] == "created":
            with contextlib.suppress(FailedPrecondition):
                proc.start()
        return proc.wait(timeout=WAIT_SLICE)


def exit_args(status: int) -> list[str]:
    return ["sh", "-c", f"exit {status}"]


class Worker(threading.Thread):
    """A workload thread: its own client, and any exception kept for the report."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.error: str = ""

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:              # reported as a violation: the workload itself broke
            import traceback
            self.error = f"{self.name}: {type(e).__name__}: {e}\n{traceback.format_exc()}"

    def work(self) -> None:
        raise NotImplementedError


class RunClient(Worker):
    """`run --rm` after `run --rm`, each container exiting with a status of its own."""

    def __init__(self, number: int, env: "Env", rng: random.Random):
        super().__init__(f"client-{number}")
        self.number, self.env, self.rng = number, env, rng
        self.outcomes: list[Outcome] = []

    def work(self) -> None:
        client = Client(self.env.address, self.env.ns, timeout=CALL_TIMEOUT)
        try:
            while not self.env.stop.is_set():
                status = self.rng.randrange(MAX_STATUS)
                via = "cli" if self.rng.random() < CLI_SHARE else "library"
                outcome = Outcome(f"c{self.number}-{len(self.outcomes):05d}", "", status, via)
                self.outcomes.append(outcome)
                self.run_one(client, outcome)
        finally:
            client.close()

    def run_one(self, client: Client, outcome: Outcome) -> None:
        started = time.monotonic()
        driver = RunDriver(client, self.env.image, outcome, exit_args(outcome.expected), self.env.spools,
                           self.env.since)
        if outcome.via == "cli":
            status = self.cli_run(outcome)
            if status is not None:
                outcome.status, outcome.done = status, True
                outcome.end(started)
                return
            driver.maybe_ran = True
        persist(client, outcome, driver.step, started + RUN_DEADLINE)
        outcome.end(started)

    def cli_run(self, outcome: Outcome) -> int | None:
        """`berth run --rm`: its exit status, or None if it failed on its way (noted)."""
        cmd = [sys.executable, "-m", "berth.cli.main", "-a", self.env.address, "-n", self.env.ns,
               "--timeout", str(CALL_TIMEOUT), "run", "--rm", self.env.image, outcome.container_id,
               *exit_args(outcome.expected)]
        try:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=CLI_TIMEOUT, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
        except subprocess.TimeoutExpired:
            outcome.note(f"berth run did not end in {CLI_TIMEOUT}s")
            return None
        if "Traceback (most recent call last)" in result.stderr:
            outcome.cli_crash = result.stderr[-3000:]
            outcome.note("berth run crashed")
            return None
        errors = [line for line in result.stderr.splitlines() if line.startswith("berth: ")]
        if errors:
            outcome.note(f"cli: {errors[0]}")
            return None
        return result.returncode


class ExecClient(Worker):
    """Execs into the long-running containers, one after another."""

    def __init__(self, env: "Env", rng: random.Random, containers: list[str]):
        super().__init__("execs")
        self.env, self.rng, self.containers = env, rng, containers
        self.outcomes: list[Outcome] = []

    def work(self) -> None:
        client = Client(self.env.address, self.env.ns, timeout=CALL_TIMEOUT)
        try:
            while not self.env.stop.wait(self.rng.uniform(0.2, 1.0)):
                outcome = Outcome(self.rng.choice(self.containers), f"x{len(self.outcomes):05d}",
                                  self.rng.randrange(MAX_STATUS), "exec")
                self.outcomes.append(outcome)
                started = time.monotonic()
                persist(client, outcome, ExecDriver(client, outcome, exit_args(outcome.expected)).step,
                        started + RUN_DEADLINE)
                outcome.end(started)
        finally:
            client.close()


class Subscriber(Worker):
    """Follows the event bus from `since`, resuming with `since` after every disconnect, and counts
    the exits it sees; notes any sequence number out of order."""

    RESUME_SLICE = 5.0

    def __init__(self, number: int, env: "Env"):
        super().__init__(f"subscriber-{number}")
        self.env = env
        self.last = env.since
        self.exits: collections.Counter = collections.Counter()
        self.statuses: dict[tuple[str, str], list] = {}
        self.anomalies: list[str] = []
        self.resumes = 0
        self.until: int | None = None          # set at the end: the head to reach before stopping
        self.deadline = 0.0

    def finish(self, head: int, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.until = head

    def _done(self) -> bool:
        return self.until is not None and (self.last >= self.until or time.monotonic() > self.deadline)

    def work(self) -> None:
        client = Client(self.env.address, self.env.ns, timeout=10)
        try:
            while not self._done():
                try:
                    for envelope in client.events.subscribe(since=self.last, timeout=self.RESUME_SLICE):
                        self.take(envelope)
                except BerthError:
                    client.close()
                    self.resumes += 1
                    time.sleep(0.2)             # a retry's backoff
        finally:
            client.close()

    def take(self, envelope: dict) -> None:
        if envelope["seq"] != self.last + 1 and len(self.anomalies) < 20:
            self.anomalies.append(f"seq {envelope['seq']} came after {self.last}")
        self.last = max(self.last, envelope["seq"])
        if envelope["topic"] == EXIT and envelope.get("namespace") == self.env.ns:
            event = envelope["event"]
            key = (event.get("container_id"), event.get("id"))
            self.exits[key] += 1
            self.statuses.setdefault(key, []).append(event.get("exit_status"))


class Puller(Worker):
    """Pulls the image again now and then (all of it is there: metadata and transfer work only)."""

    def __init__(self, env: "Env", rng: random.Random):
        super().__init__("puller")
        self.env, self.rng = env, rng
        self.pulls = 0
        self.failed: list[str] = []

    def work(self) -> None:
        client = Client(self.env.address, self.env.ns, timeout=CALL_TIMEOUT)
        try:
            while not self.env.stop.wait(self.rng.uniform(5.0, 15.0)):
                try:
                    client.pull(self.env.image, plain_http=True, timeout=120)
                    self.pulls += 1
                except BerthError as e:
                    client.close()
                    self.failed.append(f"{type(e).__name__}: {e}")
        finally:
            client.close()


@dataclasses.dataclass
class Env:
    """What every workload thread shares."""
    address: str
    ns: str
    image: str
    since: int                              # the event log's head before the workload began
    stop: threading.Event
    spools: Spools                          # the daemon's (the same directories across restarts)


class Workload:
    """All the workload's threads, started and stopped together."""

    def __init__(self, env: Env, rng: random.Random, clients: int, long_running: int):
        self.env = env
        self.long_running = [f"long-{i}" for i in range(long_running)]
        self.clients = [RunClient(i, env, random.Random(rng.getrandbits(64))) for i in range(clients)]
        self.execs = ExecClient(env, random.Random(rng.getrandbits(64)), self.long_running)
        self.subscribers = [Subscriber(i, env) for i in range(2)]
        self.puller = Puller(env, random.Random(rng.getrandbits(64)))

    @property
    def threads(self) -> list[Worker]:
        return [*self.subscribers, *self.clients, self.execs, self.puller]

    def start(self, client: Client) -> None:
        """The long-running containers first (before anything is killed), then every thread."""
        for cid in self.long_running:
            client.containers.new(cid, self.env.image, args=["sleep", "1000000"]).new_task().start()
        for thread in self.threads:
            thread.start()

    def outcomes(self) -> list[Outcome]:
        return [o for c in self.clients for o in c.outcomes] + self.execs.outcomes

    def stop(self, timeout: float) -> list[Worker]:
        """Start nothing new, let what is under way finish; the threads that did not end."""
        self.env.stop.set()
        deadline = time.monotonic() + timeout
        for thread in [*self.clients, self.execs, self.puller]:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in [*self.clients, self.execs, self.puller] if t.is_alive()]

    def stop_subscribers(self, head: int, timeout: float) -> list[str]:
        for sub in self.subscribers:
            sub.finish(head, timeout)
        for sub in self.subscribers:
            sub.join(timeout + 15)
        return [s.name for s in self.subscribers if s.is_alive()]

    def end_long_running(self, client: Client) -> list[Outcome]:
        """Kill the long-running containers and remove them: each exits 137."""
        ended = []
        for cid in self.long_running:
            outcome = Outcome(cid, "", KILLED, "long")
            driver = RunDriver(client, self.env.image, outcome, [])

            def step(driver=driver):
                if driver.outcome.status is None:
                    with contextlib.suppress(NotFound):       # exited already
                        Task(client, driver.id).kill(9)
                driver.step()
            started = time.monotonic()
            persist(client, outcome, step, started + RUN_DEADLINE)
            outcome.end(started)
            ended.append(outcome)
        return ended
