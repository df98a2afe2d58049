"""`berth tasks ...` against a detached container, and what happens when a shim dies under it.

The `berth` fixture (test_run.py) gives each test its own namespace, busybox pulled, and the
cleanup of everything the test made.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.integration import test_run
from tests.integration.test_run import mounts_under, unique
from tests.support import REPO, pid_alive, wait_until

berth = test_run.berth             # the fixture


def table(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_detached(berth, cid: str, *command: str) -> int:
    result = berth.cli("run", "-d", berth.image, cid, *(command or ("sleep", "1000")))
    assert (result.stdout, result.stderr) == ("", "")
    rows = {r[0]: r for r in table(berth.cli("tasks", "ls").stdout)[1:]}
    return int(rows[cid][1])


def test_a_detached_task_from_ls_to_wait(berth):
    cid = unique()
    pid = start_detached(berth, cid)
    rows = table(berth.cli("tasks", "ls").stdout)
    assert rows == [["TASK", "PID", "STATUS"], [cid, str(pid), "RUNNING"]]
    assert pid_alive(pid)

    # exec runs in the container's namespaces: its UTS namespace has the container's hostname.
    assert berth.cli("tasks", "exec", "--exec-id", "host", cid, "hostname").stdout == f"{cid}\n"
    assert berth.cli("tasks", "exec", cid, "sh", "-c", "exit 6", check=False).returncode == 6
    assert berth.cli("tasks", "exec", "--env", "X=1", "--cwd", "/tmp", cid, "sh", "-c", 'echo $X; pwd').stdout \
        == "1\n/tmp\n"

    freezer = os.path.join(berth.cgroup("freezer", cid), "freezer.state")
    berth.cli("tasks", "pause", cid)
    with open(freezer) as f:
        assert f.read().strip() == "FROZEN"
    assert table(berth.cli("tasks", "ls").stdout)[1] == [cid, str(pid), "PAUSED"]
    berth.cli("tasks", "resume", cid)
    with open(freezer) as f:
        assert f.read().strip() == "THAWED"

    ps = table(berth.cli("tasks", "ps", cid).stdout)
    assert ps[0] == ["PID", "EXEC"] and [str(pid), "-"] in ps[1:]

    metrics = dict(table(berth.cli("tasks", "metrics", cid).stdout)[1:])
    assert int(metrics["memory.usage"]) > 0 and int(metrics["memory.limit"]) > 0
    assert metrics["pids.current"] == "1"

    waiter = subprocess.Popen([sys.executable, "-m", "berth.cli.main", "-a", berth.daemon.address, "-n", berth.ns,
                               "tasks", "wait", cid], env=berth.daemon.env, cwd=REPO)
    try:
        berth.cli("tasks", "kill", "-a", "-s", "SIGKILL", cid)
        assert waiter.wait(30) == 137
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert berth.cli("tasks", "wait", cid, check=False).returncode == 137
    assert table(berth.cli("tasks", "ls").stdout)[1] == [cid, str(pid), "STOPPED"]
    berth.cli("tasks", "rm", cid)
    berth.assert_gone(cid)
    assert cid in berth.cli("snapshots", "ls", "-q").stdout.split()
    berth.cli("containers", "rm", cid)
    assert cid not in berth.cli("snapshots", "ls", "-q").stdout.split()
    assert [t for t, _ in berth.events(cid=cid)] == [
        "/tasks/create", "/tasks/start",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]


def test_tasks_rm_force_kills_first(berth):
    cid = unique()
    start_detached(berth, cid)
    berth.cli("tasks", "rm", "-f", cid)
    berth.assert_gone(cid)
    # The container stays, and can run again.
    berth.cli("tasks", "start", "-d", cid)
    assert table(berth.cli("tasks", "ls").stdout)[1][2] == "RUNNING"
    berth.cli("tasks", "kill", "-s", "KILL", cid)
    berth.cli("tasks", "wait", cid, check=False)
    berth.cli("tasks", "rm", cid)


def test_a_shim_killed_with_sigkill_is_cleaned_up(berth):
    cid = unique()
    pid = start_detached(berth, cid)
    state = berth.client.tasks.state(cid)
    shim = state["shim_pid"]
    task_dir = berth.task_dir(cid)
    assert mounts_under(os.path.join(task_dir, "rootfs"))
    seq = berth.client.events.head()
    waiter = subprocess.Popen([sys.executable, "-m", "berth.cli.main", "-a", berth.daemon.address, "-n", berth.ns,
                               "tasks", "wait", cid], env=berth.daemon.env, cwd=REPO)
    try:
        wait_until(lambda: _waiting(berth), 10, what="the wait to reach berthd")
        os.kill(shim, signal.SIGKILL)
        status = waiter.wait(30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert status in (137, 255)
    berth.assert_gone(cid)
    wait_until(lambda: not pid_alive(pid), 10, what="the container's init to be gone")
    events = wait_until(lambda: (lambda ev: ev if len(ev) >= 2 else None)(berth.events(seq, cid)), 15,
                        what="/tasks/exit and /tasks/delete")
    assert [t for t, _ in events] == ["/tasks/exit", "/tasks/delete"]
    assert events[0][1]["exit_status"] == events[1][1]["exit_status"] == status
    assert events[0][1]["pid"] == pid
    assert berth.cli("tasks", "ls", "-q").stdout.split() == []
    assert berth.runtime_ids() == []
    # The container is intact: it runs again.
    berth.cli("tasks", "start", "-d", cid)
    berth.cli("tasks", "kill", "-s", "9", cid)
    assert berth.cli("tasks", "wait", cid, check=False).returncode == 137
    berth.cli("tasks", "rm", cid)


def _waiting(berth, count: int = 1) -> bool:
    """The runtime actor holds `count` waits."""
    for actor in berth.client.actors()["actors"]:
        if actor["name"] == "runtime":
            return (actor.get("stats") or {}).get("waits", 0) >= count
    return False


def test_exec_of_a_missing_binary_leaks_nothing(berth):
    cid = unique()
    start_detached(berth, cid)
    shim = berth.client.tasks.state(cid)["shim_pid"]
    runtime = next(a["pid"] for a in berth.client.actors()["actors"] if a["name"] == "runtime")

    def attempt():
        result = berth.cli("tasks", "exec", cid, "/no/such/binary", check=False)
        assert result.returncode == 1 and "/no/such/binary" in result.stderr, result.stderr
        # The runtime's own complaint reaches the process's stderr; ours is the last line.
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("berth: ") and "no such file or directory" in last, last
    attempt()
    baseline = (fd_count(shim), fd_count(runtime))
    for _ in range(20):
        attempt()
    wait_until(lambda: (fd_count(shim), fd_count(runtime)) == baseline, 10,
               what=f"descriptors back to {baseline}, at {(fd_count(shim), fd_count(runtime))}")
    assert berth.client.tasks.state(cid)["execs"] == {}
    assert berth.cli("tasks", "exec", cid, "echo", "fine").stdout == "fine\n"


def test_many_waits_do_not_hold_up_other_requests(berth):
    """A hundred clients waiting on one task: creates, starts and execs of another go on (each
    within a deadline shorter than a wait is held), and every wait gets the exit."""
    import threading
    waited = unique()
    start_detached(berth, waited)
    results, errors = [], []

    def wait() -> None:
        client = berth.daemon.client(berth.ns, timeout=60)
        try:
            results.append(client.tasks.get(waited).wait(timeout=60))
        except Exception as e:                      # reported by the assertion below
            errors.append(e)
        finally:
            client.close()
    threads = [threading.Thread(target=wait) for _ in range(100)]
    for t in threads:
        t.start()

    wait_until(lambda: _waiting(berth, 100), 30, what="100 waits held by the runtime actor")

    other = unique()
    quick = berth.daemon.client(berth.ns, timeout=4)      # less than the 5 s a wait is held
    try:
        container = quick.containers.new(other, berth.image, args=["sleep", "1000"])
        task = container.new_task()
        task.start()
        assert task.exec("e1", ["true"]).start() > 0
        assert {t["container_id"] for t in quick.tasks.list()} == {waited, other}
    finally:
        quick.close()
    berth.cli("tasks", "kill", "-s", "9", waited)
    for t in threads:
        t.join(60)
    assert errors == [] and results == [137] * 100
