"""Every failpoint site fired in a real berthd, and what berth does to recover (docs/failpoints.md).

Failpoints come from the config file and BERTH_FAILPOINTS at start, or from `berth debug
failpoints set` at run time. Several sites share a daemon: a count spent is spent for every
berthd process, so each step below fires exactly where the test says, once.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import tempfile
import time

import pytest

from bus.errors import BerthError, NotFound, Unavailable
from bus.failpoints import CRASH_EXIT
from tests.integration import test_run
from tests.integration.test_run import mounts_under, unique
from tests.support import pid_alive, proc_title, wait_until

berth = test_run.berth             # the fixture: a berthd, a namespace, busybox pulled, cleanup


def restarts(daemon) -> dict[str, int]:
    client = daemon.client()
    try:
        return {a["name"]: a["restarts"] for a in client.actors()["actors"]}
    finally:
        client.close()


def all_running(daemon) -> bool:
    client = daemon.client()
    try:
        return all(a["status"] == "running" for a in client.actors()["actors"])
    finally:
        client.close()


def failpoints(daemon) -> dict[str, str]:
    rows = daemon.cli("debug", "failpoints", "ls").stdout.splitlines()
    assert rows[0].split() == ["NAME", "TERM"]
    return dict(row.split() for row in rows[1:])


def set_failpoint(daemon, name: str, term: str) -> None:
    assert daemon.cli("debug", "failpoints", "set", name, term).stdout == f"{name}={term}\n"


def refused(result, message: str) -> bool:
    return result.returncode == 1 and message in result.stderr


def test_a_bad_failpoint_spec_stops_berthd_at_start(make_daemon):
    d = make_daemon(env={"BERTH_FAILPOINTS": "content.commit=1*crush"})
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "berthd: bad failpoint step '1*crush'" in d.log()


def test_store_and_bus_sites_fire_and_berth_recovers(make_daemon, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('failpoints = "content.write=1*crash"\n')
    d = make_daemon(env={"BERTH_FAILPOINTS": "content.commit=1*crash"}, args=["--config", str(config)])
    d.start()
    assert failpoints(d) == {"content.write": "1*crash", "content.commit": "1*crash"}
    client = d.client("default", timeout=30)

    # content.write, then content.commit: the content actor dies twice under one write; the
    # supervisor restarts it, the router hands the chunk and the commit to the new one, and the
    # client sees only the latency.
    blob = os.urandom(3 << 20)
    info = client.content.write("fp-blob", blob)
    assert info["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest() and info["size"] == len(blob)
    assert client.content.read_all(info["digest"]) == blob
    assert client.content.list_statuses() == []
    assert restarts(d)["content"] == 2
    assert failpoints(d) == {"content.write": "0*crash", "content.commit": "0*crash"}
    log = d.log()
    assert "failpoint content.write: crash" in log and "failpoint content.commit: crash" in log
    assert log.count(f"exited with status {CRASH_EXIT}") == 2

    # metadata.commit: an error rolls the transaction back and is the client's answer; a crash
    # loses the transaction whole, and the request is done again by the new metadata actor.
    set_failpoint(d, "metadata.commit", "1*error(Unavailable)->1*crash")
    assert refused(d.cli("namespaces", "create", "fp1", check=False),
                   "failpoint metadata.commit: injected Unavailable")
    assert "fp1" not in d.cli("namespaces", "ls", "-q").stdout.split()
    d.cli("namespaces", "create", "fp1")
    assert d.cli("namespaces", "ls", "-q").stdout.split().count("fp1") == 1
    assert restarts(d)["metadata"] == 1
    assert failpoints(d)["metadata.commit"] == "0*error(Unavailable)->0*crash"

    # snapshot.commit: the snapshot actor dies inside the commit's transaction; the snapshot is
    # still active, and the redelivered commit commits it.
    d.cli("snapshots", "prepare", "fp-active")
    set_failpoint(d, "snapshot.commit", "1*crash")
    d.cli("snapshots", "commit", "fp-committed", "fp-active")
    rows = [r.split() for r in d.cli("snapshots", "ls").stdout.splitlines()[1:]]
    assert [(r[0], r[-1]) for r in rows] == [("fp-committed", "Committed")]
    assert restarts(d)["snapshot"] == 1

    # worker.dispatch: a delay holds one method of one actor; a crash there is redelivered too.
    set_failpoint(d, "worker.dispatch.content.info", "1*delay(600)")
    started = time.monotonic()
    client.content.info(info["digest"])
    assert time.monotonic() - started >= 0.6
    started = time.monotonic()
    client.content.info(info["digest"])
    assert time.monotonic() - started < 0.6
    set_failpoint(d, "worker.dispatch.content.list", "1*crash")
    assert info["digest"] in d.cli("content", "ls", "-q").stdout.split()
    assert restarts(d)["content"] == 3

    # A failpoint set at run time is seen by an actor restarted after it was set.
    set_failpoint(d, "worker.dispatch.metadata.list_namespaces", "1*error(PermissionDenied)")
    metadata = d.actor_pids()["metadata"]
    os.kill(metadata, signal.SIGKILL)
    wait_until(lambda: d.actor_pids().get("metadata", metadata) != metadata and all_running(d), 15,
               what="metadata to be restarted")
    assert refused(d.cli("namespaces", "ls", check=False),
                   "failpoint worker.dispatch.metadata.list_namespaces: injected PermissionDenied")
    assert "fp1" in d.cli("namespaces", "ls", "-q").stdout.split()

    # router.forward: the router answers for the actor, which never hears of the request.
    set_failpoint(d, "router.forward.content.list", "1*error(ResourceExhausted)")
    assert refused(d.cli("content", "ls", check=False),
                   "failpoint router.forward.content.list: injected ResourceExhausted")
    assert info["digest"] in d.cli("content", "ls", "-q").stdout.split()

    # events.publish: the events actor is not reached twice; the publisher keeps the event in its
    # spool and sends it again until it is taken, once.
    seq = client.events.head()
    set_failpoint(d, "events.publish.namespaces.create", "2*error(Unavailable)")
    d.cli("namespaces", "create", "fp2")
    created = wait_until(lambda: [e for e in client.events.replay(seq) if e["topic"] == "/namespaces/create"],
                         15, what="/namespaces/create to be delivered")
    assert [e["event"]["name"] for e in created] == ["fp2"]
    assert failpoints(d)["events.publish.namespaces.create"] == "0*error(Unavailable)"

    # A bad term is refused; the daemon serves on. `clear` clears.
    assert refused(d.cli("debug", "failpoints", "set", "content.commit", "1*crash->", check=False),
                   "bad failpoint step ''")
    assert refused(d.cli("debug", "failpoints", "set", "content.comit", "crash", check=False),
                   "no failpoint site 'content.comit'")
    assert d.cli("debug", "failpoints", "clear").stdout.split() == sorted([
        "content.write", "content.commit", "metadata.commit", "snapshot.commit", "worker.dispatch.content.info",
        "worker.dispatch.content.list", "worker.dispatch.metadata.list_namespaces", "router.forward.content.list",
        "events.publish.namespaces.create"])
    assert failpoints(d) == {}

    # router.forward crash: berthd itself exits; committed data is all there when it is back,
    # with the failpoints of its config and environment armed again.
    set_failpoint(d, "router.forward.content.info", "1*crash")
    client.close()
    client = d.client("default", timeout=1)
    with pytest.raises(BerthError):
        client.content.info(info["digest"])
    client.close()
    assert d.proc.wait(15) == CRASH_EXIT
    again = make_daemon(dir=d.dir, env={"BERTH_FAILPOINTS": "content.commit=1*crash"},
                        args=["--config", str(config)]).start()
    client = again.client("default")
    try:
        assert client.content.read_all(info["digest"]) == blob
        assert failpoints(again) == {"content.write": "1*crash", "content.commit": "1*crash"}
    finally:
        client.close()
        again.stop()


def test_pull_sites_fire_and_the_pull_recovers(daemon, registry, busybox_image):
    registry.push(busybox_image, "busybox:latest")
    ref = f"{registry.host}/busybox:latest"
    ns = unique("t")

    # transfer.fetch, then snapshot.apply, in one pull: the transfer actor dies before its first
    # blob, the pull is redelivered and starts again; the snapshot actor dies with a layer applied
    # but not committed, and the unpack is redelivered and applied again.
    set_failpoint(daemon, "transfer.fetch", "1*crash")
    set_failpoint(daemon, "snapshot.apply", "1*crash")
    daemon.cli("pull", "--plain-http", ref, namespace=ns, timeout=120)
    assert {k: v for k, v in restarts(daemon).items() if v} == {"transfer": 1, "snapshot": 1}
    client = daemon.client(ns)
    image = client.images.get(ref)
    daemon.cli("gc", namespace=ns)              # the snapshot the crash left, held by the pull's lease
    committed = daemon.cli("snapshots", "ls", namespace=ns).stdout.splitlines()[1:]
    assert committed and all(row.split()[-1] == "Committed" for row in committed)
    assert not any(row.startswith("extract-") for row in committed)
    container = client.containers.new(unique(), image, args=["sleep", "1000"])    # the unpacked image runs
    try:
        task = container.new_task()
        task.start()
        task.kill(signal.SIGKILL)
        assert task.wait(30) == 137
        task.delete()
    finally:
        container.delete()

    # An error at transfer.fetch is the pull's error; the next pull fetches.
    other = unique("t")
    set_failpoint(daemon, "transfer.fetch", "1*error(Unavailable)")
    assert refused(daemon.cli("pull", "--plain-http", ref, namespace=other, check=False, timeout=120),
                   "failpoint transfer.fetch: injected Unavailable")
    daemon.cli("pull", "--plain-http", ref, namespace=other, timeout=120)
    assert daemon.client(other).images.get(ref)["target"] == image["target"]
    assert failpoints(daemon) == {"transfer.fetch": "0*error(Unavailable)", "snapshot.apply": "0*crash"}


def test_a_pull_whose_transfer_actor_is_killed_mid_blob_takes_its_writer_over(daemon, registry, busybox_image):
    """The transfer actor is killed with a blob's writer open in the content actor (a write held
    there by a delay). The redelivered pull takes that writer over as soon as the write ends,
    since its owner is gone: it does not wait out the two minutes an idle writer keeps its lock."""
    registry.push(busybox_image, "busybox:latest")
    ref = f"{registry.host}/busybox:latest"
    ns = unique("t")
    set_failpoint(daemon, "content.write", "1*delay(2000)")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(daemon.cli, "pull", "--plain-http", ref, namespace=ns, check=False, timeout=60)
        wait_until(lambda: failpoints(daemon)["content.write"] == "0*delay(2000)", what="a write to be held")
        os.kill(daemon.actor_pids()["transfer"], signal.SIGKILL)
        pulled = pulling.result(timeout=90)
    assert pulled.returncode == 0, pulled.stderr
    assert restarts(daemon)["transfer"] == 1
    assert daemon.client(ns).images.get(ref)["target"]["digest"].startswith("sha256:")


def test_task_sites_fire_and_tasks_are_cleaned_up(berth):
    d, client = berth.daemon, berth.client

    def run_detached(cid: str, *command: str) -> None:
        berth.cli("run", "-d", berth.image, cid, *(command or ("sleep", "1000")))

    def task_events(seq: int, cid: str) -> list[tuple[str, int | None]]:
        return [(t, e.get("exit_status")) for t, e in berth.events(seq, cid)]

    # runtime.create crash: the runtime actor dies with the rootfs mounted and no shim; the new
    # one cleans the task directory up and runs the redelivered create. `run` just works.
    set_failpoint(d, "runtime.create", "1*crash")
    run_detached("c1")
    assert client.tasks.state("c1")["status"] == "running"
    assert restarts(d)["runtime"] == 1
    assert mounts_under(berth.task_dir("c1")) == [os.path.realpath(os.path.join(berth.task_dir("c1"), "rootfs"))]

    # shim.kill: an error leaves the task running; a crash kills the shim, and berthd kills the
    # container and cleans the task up as after any shim death: exit 137, told once.
    seq = client.events.head()
    set_failpoint(d, "shim.kill", "1*error(FailedPrecondition)->1*crash")
    assert refused(berth.cli("tasks", "kill", "c1", check=False), "failpoint shim.kill: injected FailedPrecondition")
    assert client.tasks.state("c1")["status"] == "running"
    init = client.tasks.state("c1")["pid"]
    assert berth.cli("tasks", "kill", "c1", check=False).returncode == 1
    assert berth.cli("tasks", "wait", "c1", check=False).returncode == 137
    berth.assert_gone("c1")
    wait_until(lambda: not pid_alive(init), 10, what="c1's init to be killed")
    wait_until(lambda: len(task_events(seq, "c1")) == 2, 15, what="c1's exit and delete")
    assert task_events(seq, "c1") == [("/tasks/exit", 137), ("/tasks/delete", 137)]
    berth.cli("containers", "rm", "c1")

    # shim.create and shim.start: the shim dies with the container created; berthd deletes the
    # container and the task, and the container's next task runs.
    for site, cid in (("shim.create", "c2"), ("shim.start", "c3")):
        set_failpoint(d, site, "1*crash")
        assert berth.cli("run", "-d", berth.image, cid, "sleep", "1000", check=False).returncode == 1
        berth.assert_gone(cid)
        assert client.tasks.list() == []
        berth.cli("tasks", "start", "-d", cid)
        assert client.tasks.state(cid)["status"] == "running"
        berth.cli("tasks", "kill", "-s", "KILL", cid)
        assert berth.cli("tasks", "wait", cid, check=False).returncode == 137
        berth.cli("tasks", "rm", cid)
        berth.cli("containers", "rm", cid)

    # events.publish: the shim dies with the exit recorded but not delivered; berthd forwards the
    # event from the dead shim's spool: the real status, told once, in order.
    seq = client.events.head()
    set_failpoint(d, "events.publish.tasks.exit", "1*crash")
    gate = tempfile.mkdtemp(dir=d.dir)
    berth.cli("run", "-d", "--mount", f"type=bind,src={gate},dst=/gate,options=rbind:ro", berth.image, "c4",
              "sh", "-c", "while [ ! -e /gate/go ]; do sleep 0.02; done; exit 3")
    open(os.path.join(gate, "go"), "w").close()          # exit now: `run -d` has had its answer
    assert berth.cli("tasks", "wait", "c4", check=False).returncode == 3
    berth.assert_gone("c4")
    wait_until(lambda: len(task_events(seq, "c4")) == 4, 15, what="c4's events")
    assert task_events(seq, "c4") == [("/tasks/create", None), ("/tasks/start", None), ("/tasks/exit", 3),
                                      ("/tasks/delete", 3)]
    berth.cli("containers", "rm", "c4")

    # shim.delete: the shim dies deleting a stopped task; berthd finishes the job and tells the
    # delete once, with the status the shim had recorded.
    for cid in ("c5", "c6"):
        run_detached(cid)
        berth.cli("tasks", "kill", "-s", "KILL", cid)
        assert berth.cli("tasks", "wait", cid, check=False).returncode == 137
    seq = client.events.head()
    set_failpoint(d, "shim.delete", "1*crash")
    with pytest.raises(Unavailable):
        client.tasks.get("c5").delete()
    berth.assert_gone("c5")
    with pytest.raises(NotFound):
        client.tasks.get("c5").delete()
    wait_until(lambda: task_events(seq, "c5"), 15, what="c5's delete")
    assert task_events(seq, "c5") == [("/tasks/delete", 137)]

    # runtime.delete: the runtime actor dies with the task marked for deletion; the new one adopts
    # the shim, and the redelivered delete deletes. `tasks rm` just works.
    set_failpoint(d, "runtime.delete", "1*crash")
    berth.cli("tasks", "rm", "c6")
    berth.assert_gone("c6")
    assert restarts(d)["runtime"] == 2
    wait_until(lambda: task_events(seq, "c6"), 15, what="c6's delete")
    assert task_events(seq, "c6") == [("/tasks/delete", 137)]
    assert failpoints(d) == {"runtime.create": "0*crash", "shim.kill": "0*error(FailedPrecondition)->0*crash",
                             "shim.create": "0*crash", "shim.start": "0*crash",
                             "events.publish.tasks.exit": "0*crash", "shim.delete": "0*crash",
                             "runtime.delete": "0*crash"}


def test_a_create_cut_off_once_the_shim_serves_is_done_again(berth):
    """runtime.spawn crash: the runtime actor dies with the task's shim serving and nothing
    created. The new one finds that shim, shuts it down and cleans up, and the redelivered
    create makes the task afresh: one shim, one rootfs mount, and it runs."""
    d, client = berth.daemon, berth.client
    set_failpoint(d, "runtime.spawn", "1*crash")
    berth.cli("run", "-d", berth.image, "c7", "sleep", "1000")
    assert restarts(d)["runtime"] == 1
    state = client.tasks.state("c7")
    assert state["status"] == "running"
    title = f"berth-shim: {berth.ns}/c7"
    wait_until(lambda: [p for p in _pids() if proc_title(p) == title] == [state["shim_pid"]], 15,
               what="the cut-off create's shim to be gone")
    assert mounts_under(berth.task_dir("c7")) == [os.path.realpath(os.path.join(berth.task_dir("c7"), "rootfs"))]
    assert failpoints(d) == {"runtime.spawn": "0*crash"}
    berth.cli("tasks", "kill", "-s", "9", "c7")
    assert berth.cli("tasks", "wait", "c7", check=False).returncode == 137
    berth.cli("tasks", "rm", "c7")
    berth.assert_gone("c7")


def test_a_create_and_a_start_done_before_the_runtime_actor_died_are_not_done_twice(berth):
    """runtime.created and runtime.started crashes: the runtime actor dies with the create (then
    the start) done and not answered. The router delivers each again; the new runtime actor
    answers with what was done instead of refusing it, so `run` works, and the task was created
    and started once: one shim, one /tasks/create, one /tasks/start."""
    d, client = berth.daemon, berth.client
    set_failpoint(d, "runtime.created", "1*crash")
    set_failpoint(d, "runtime.started", "1*crash")
    seq = client.events.head()
    berth.cli("run", "-d", berth.image, "c8", "sleep", "1000")
    assert restarts(d)["runtime"] == 2
    state = client.tasks.state("c8")
    assert state["status"] == "running"
    assert [p for p in _pids() if proc_title(p) == f"berth-shim: {berth.ns}/c8"] == [state["shim_pid"]]
    wait_until(lambda: len(berth.events(seq, "c8")) >= 2, 15, what="c8's create and start events")
    assert [t for t, _ in berth.events(seq, "c8")] == ["/tasks/create", "/tasks/start"]
    assert failpoints(d) == {"runtime.created": "0*crash", "runtime.started": "0*crash"}
    berth.cli("tasks", "kill", "-s", "9", "c8")
    assert berth.cli("tasks", "wait", "c8", check=False).returncode == 137
    berth.cli("tasks", "rm", "c8")
    berth.assert_gone("c8")


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]
