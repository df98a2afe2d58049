"""One chaos run from start to end: set up, drive the workload under the killer, stop, check, clean up."""
from __future__ import annotations

import collections
import dataclasses
import os
import random
import re
import threading
import time

from berth.client import Client
from tests.chaos import invariants
from tests.chaos.cluster import Cluster
from tests.chaos.killer import Killer
from tests.chaos.workload import CALL_TIMEOUT, RUN_DEADLINE, SPOOL_DRAIN, Env, Spools, Workload
from tests.integration.test_run import Berth
from tests.registry import Registry, build_busybox_image
from tests.support import wait_until

PROGRESS_EVERY = 10.0
CATCH_UP = 60.0               # seconds the subscribers may take to reach the log's head at the end
LOGS = "/tmp"                 # where the logs of a run that found violations are kept


@dataclasses.dataclass
class Result:
    seed: int
    violations: list[str]
    notes: list[str]
    logs: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


class Say:
    """Progress lines, each with the seconds since the start."""

    def __init__(self, out):
        self.out, self.started, self.lock = out, time.monotonic(), threading.Lock()

    def __call__(self, message: str) -> None:
        with self.lock:
            print(f"[{time.monotonic() - self.started:7.1f}s] {message}", file=self.out, flush=True)


def chaos(duration: float, seed: int | None = None, clients: int = 4, long_running: int = 2,
          keep_logs: bool = False, out=None) -> Result:
    import sys
    seed = random.SystemRandom().randrange(1 << 32) if seed is None else seed
    say = Say(out or sys.stdout)
    say(f"chaos: seed {seed}, {duration:g}s, {clients} clients, {long_running} long-running containers")
    rng = random.Random(seed)
    violations: list[str] = []
    notes: list[str] = []
    logs: list[str] = []
    registry = Registry().start()
    cluster, berth = Cluster(), None
    try:
        cluster.start()
        berth = Berth(cluster.daemon, registry, build_busybox_image())
        say(f"berthd at {cluster.daemon.dir}, namespace {berth.ns}, pulled {berth.image}")
        violations, notes = _run(cluster, berth, rng, duration, clients, long_running, say)
    except BaseException as e:
        violations.append(f"the chaos run itself failed: {type(e).__name__}: {e}")
        raise
    finally:
        notes += [f"berthd logged: {line}" for line in cluster.logged_errors()[:30]]
        if violations or keep_logs:
            logs = cluster.keep_logs(os.path.join(LOGS, f"berth-chaos-{seed}-{int(time.time())}"))
        if berth is not None:
            berth.daemon = cluster.daemon
            berth.cleanup()
        cluster.cleanup()
        registry.stop()
        for line in notes:
            say(f"note: {line}")
        for line in violations:
            say(f"VIOLATION: {line}")
        if logs:
            say(f"berthd logs kept in {os.path.dirname(logs[0])}")
        say(f"chaos: seed {seed}: {len(violations)} invariant violations")
    return Result(seed, violations, notes, logs)


def _run(cluster: Cluster, berth: Berth, rng: random.Random, duration: float, clients: int,
         long_running: int, say) -> tuple[list[str], list[str]]:
    client = Client(cluster.address, berth.ns, timeout=CALL_TIMEOUT)
    spools = Spools(cluster.daemon.root, cluster.daemon.state, berth.ns)
    env = Env(cluster.address, berth.ns, berth.image, client.events.head(), threading.Event(), spools)
    workload = Workload(env, rng, clients, long_running)
    killer = Killer(cluster, random.Random(rng.getrandbits(64)), duration, say)
    violations: list[str] = []
    try:
        workload.start(client)
        killer.start()
        started = time.monotonic()
        while (left := duration - (time.monotonic() - started)) > 0:
            killer.stopping.wait(min(PROGRESS_EVERY, left))
            _progress(workload, cluster, say)
        killer.stop()
        say("stopping: no new runs; those under way finish")
        stuck = workload.stop(RUN_DEADLINE + 60)
        violations += [f"workload thread {t.name} did not end; it is at:\n{_stack(t)}{_router(client)}" for t in stuck]
        _progress(workload, cluster, say)
        wait_until(lambda: not spools.pending(), SPOOL_DRAIN, 0.05, "every spooled event to be delivered")
        head = client.events.head()
        violations += [f"{name} did not reach the log's head {head} in {CATCH_UP}s"
                       for name in workload.stop_subscribers(head, CATCH_UP)]
    finally:
        env.stop.set()
        if killer.is_alive():
            killer.stop()
        for sub in workload.subscribers:
            if sub.until is None:
                sub.finish(0, 0)
    violations += [t.error for t in [*workload.threads, killer] if t.error]

    outcomes = workload.outcomes()
    ctx = invariants.Context(client, berth.ns, cluster.daemon.root, cluster.daemon.state, cluster.daemon.dir,
                             env.since, outcomes, workload.subscribers, set(workload.long_running),
                             {o.container_id for o in outcomes if not o.exec_id})
    say(f"checking {len(invariants.WHILE_RUNNING)} invariants with the long-running containers up")
    violations += invariants.check(ctx, invariants.WHILE_RUNNING)
    ended = workload.end_long_running(client)
    ctx.outcomes = outcomes + ended
    ctx.live, ctx.removed = set(), ctx.removed | set(workload.long_running)
    say("checking again with the long-running containers gone")
    violations += invariants.outcomes(dataclasses.replace(ctx, outcomes=ended))
    violations += invariants.check(ctx, invariants.ONCE_EMPTY)
    client.close()
    return list(dict.fromkeys(violations)), ctx.notes + _summary(workload, killer, cluster)


def _stack(thread: threading.Thread) -> str:
    import sys
    import traceback
    frame = sys._current_frames().get(thread.ident)
    return "".join(traceback.format_stack(frame)) if frame else "(gone)\n"


def _router(client: Client) -> str:
    """What berthd's router holds: requests in flight, queued per actor."""
    from bus.errors import BerthError
    try:
        return f"berthd's router: {client.actors()['router']}"
    except BerthError as e:
        return f"berthd's router did not answer: {e}"


def _progress(workload: Workload, cluster: Cluster, say) -> None:
    outcomes = workload.outcomes()
    done = sum(o.done for o in outcomes)
    failed = sum(o.ended and not o.done for o in outcomes)
    say(f"{done} runs and execs done, {failed} failed, {len(outcomes) - done - failed} under way, "
        f"{sum(o.retries for o in outcomes)} retries; {cluster.actor_kills} actors killed, "
        f"berthd restarted {cluster.restarts} times")


def _summary(workload: Workload, killer: Killer, cluster: Cluster) -> list[str]:
    outcomes = workload.outcomes()
    by_via = collections.Counter(o.via for o in outcomes)
    retried = [o for o in outcomes if o.retries]
    errors = collections.Counter(re.sub(r"\d+", "N", e)[:160] for o in outcomes for e in o.errors)
    slowest = max(outcomes, key=lambda o: o.took, default=None)
    return [
        f"{len(outcomes)} runs and execs: {dict(by_via)}; {len(retried)} needed retries",
        f"slowest: {slowest.describe()} took {slowest.took:.1f}s; errors {slowest.errors}" if slowest else "no runs",
        *(f"met {n} x {error}" for error, n in errors.most_common(15)),
        f"killed: {collections.Counter(name for _, name in killer.kills)}",
        f"pulls: {workload.puller.pulls} done, {len(workload.puller.failed)} cut off",
        f"subscribers resumed {[s.resumes for s in workload.subscribers]} times",
    ]
