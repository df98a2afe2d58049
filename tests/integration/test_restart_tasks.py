"""berthd killed with SIGKILL under running containers, containers dying while it is down, and
berthd started again on the same directories: the shims outlive it, the new runtime actor finds
them, and no exit is lost or told twice.

20 containers, the number in the issue. The `berth` fixture (test_run.py) gives the namespace,
busybox and the cleanup.
"""
from __future__ import annotations

import json
import os
import signal
import time

from berth.oci import with_process_args
from tests.integration import test_run
from tests.integration.test_run import unique
from tests.support import pid_alive, wait_until

berth = test_run.berth             # the fixture

CONTAINERS = 20
KILLED = 2


def alive(pid: int) -> bool:
    try:
        return pid_alive(pid)
    except ProcessLookupError:        # went between the open and the read
        return False


def test_tasks_survive_a_daemon_kill_and_exits_meanwhile_are_told_once(make_daemon, berth, daemon):
    # make_daemon first: torn down last, so the berthd started here outlives the cleanup of `berth`.
    client = berth.client
    ids = [unique(f"r{i:02d}-") for i in range(CONTAINERS)]
    tasks = {}
    for cid in ids:
        container = client.containers.new(cid, berth.image, spec_opts=[with_process_args("sleep", "1000")])
        task = container.new_task()
        task.start()
        tasks[cid] = task
    shims = {cid: client.tasks.state(cid)["shim_pid"] for cid in ids}
    inits = {cid: t.pid for cid, t in tasks.items()}
    before = client.events.head()
    client.close()

    # Every berthd process goes: the supervisor first, its actors and the zygote with it.
    daemon.kill9()
    wait_until(lambda: not any(alive(p) for p in daemon.known_pids), 15, what="every berthd process to die")
    assert all(alive(p) for p in shims.values())
    killed = ids[:KILLED]
    for cid in killed:
        os.kill(inits[cid], signal.SIGKILL)
    wait_until(lambda: not any(alive(inits[c]) for c in killed), 10, what="the killed inits to be reaped")

    started = time.monotonic()
    again = make_daemon(dir=daemon.dir).start()
    berth.daemon = again
    client = berth.client = again.client(berth.ns, timeout=60)
    listed = {t["container_id"]: t for t in client.tasks.list()}
    answered = time.monotonic() - started
    print(f"\n{CONTAINERS} tasks answered {answered:.2f}s after berthd was started again")

    assert set(listed) == set(ids)
    for cid in killed:
        assert (listed[cid]["status"], listed[cid]["exit_status"]) == ("stopped", 137)
    for cid in ids[KILLED:]:
        assert listed[cid]["status"] == "running" and listed[cid]["pid"] == inits[cid]
    rows = {line.split()[0]: line.split() for line in berth.cli("tasks", "ls").stdout.splitlines()[1:]}
    assert all(rows[cid][2] == ("STOPPED" if cid in killed else "RUNNING") for cid in ids)

    # The running ones accept exec (through the CLI for one, the library for the rest).
    assert berth.cli("tasks", "exec", ids[-1], "hostname").stdout == f"{ids[-1]}\n"
    for cid in ids[KILLED:-1]:
        proc = client.tasks.get(cid).exec("check", ["true"])
        proc.start()
        assert proc.wait(timeout=30) == 0
        proc.delete()

    # Each killed one's exit, spooled by its shim while berthd was down, arrives exactly once.
    def exits():
        found = {cid: 0 for cid in killed}
        for topic, event in berth.events(before):
            if topic == "/tasks/exit" and event.get("container_id") in found and event.get("id") == event["container_id"]:
                found[event["container_id"]] += 1
        return found
    wait_until(lambda: all(n >= 1 for n in exits().values()), 15, what="the spooled exits")
    result = berth.cli("events", "--since", str(before), "--format", "json", "--timeout", "2")
    seen = [json.loads(line) for line in result.stdout.splitlines()]
    for cid in killed:
        mine = [e for e in seen if e["topic"] == "/tasks/exit" and e["event"]["container_id"] == cid]
        assert len(mine) == 1 and mine[0]["event"]["exit_status"] == 137, mine

    # wait answers for every one.
    for cid in killed:
        assert berth.cli("tasks", "wait", cid, check=False).returncode == 137
    for cid in ids[KILLED:]:
        client.tasks.get(cid).kill(signal.SIGKILL)
    for cid in ids[KILLED:]:
        assert client.tasks.get(cid).wait(timeout=30) == 137
    for cid in ids:
        client.tasks.get(cid).delete()
        client.containers.load(cid).delete(snapshot=True)
    for cid in ids:
        berth.assert_gone(cid)
