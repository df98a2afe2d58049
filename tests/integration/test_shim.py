"""The shim end to end: spawned by a zygote, running busybox bundles under runc and crun, its
events landing in a real berthd's log.

Each test gets its own berthd (the `daemon` fixture; the shim publishes to its address), a zygote
forked from the test process, bundles unpacked by umoci from the busybox test image with a cgroup
of their own (`/berth-test-<random>` under every v1 controller), and short paths under /tmp (socket
paths are limited to 108 bytes). Cleanup is by pid: shims, container processes, then the runtime's
state and the cgroups.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace

import pytest

from bus.client import Connection
from bus.errors import FailedPrecondition, InvalidArgument, NotFound
from shimd.runtime_cli import command, hybrid_cgroups
from shimd.zygote import Zygote
from tests.registry import build_busybox_image
from tests.support import REPO, pid_alive, proc_title, wait_until

CGROUP_V1 = "/sys/fs/cgroup"
NS = "ns"

needs_crun = pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed")
RUNTIMES = ["runc", pytest.param("crun", marks=[pytest.mark.needs_crun, needs_crun])]


def criu_works() -> bool:
    if shutil.which("criu") is None:
        return False
    return subprocess.run(["criu", "check"], capture_output=True).returncode == 0


def stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def open_files(pid: int) -> set[str]:
    """What a process's descriptors point at."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass                          # closed meanwhile
    return links


def read_until_eof(fd: int, timeout: float = 10.0) -> bytes:
    """Everything in a FIFO until its last writer has gone."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no EOF within {timeout}s; read {data!r}")
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def read_until(fd: int, wanted, timeout: float = 10.0) -> bytes:
    """Read until `wanted(data)` holds."""
    deadline = time.monotonic() + timeout
    data = b""
    while not wanted(data):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for output; read {data!r}")
        if select.select([fd], [], [], remaining)[0]:
            try:
                data += os.read(fd, 65536)
            except BlockingIOError:
                pass
    return data


class Shim:
    """A spawned shim, called on its own socket."""

    def __init__(self, pid: int, ns: str, id: str, task_dir: str, runtime: str, runtime_root: str):
        self.pid, self.ns, self.id = pid, ns, id
        self.task_dir, self.runtime, self.runtime_root = task_dir, runtime, runtime_root
        self.conn = Connection(f"ipc://{task_dir}/shim.sock", check=False, timeout=30)
        self.container_pids: set[int] = set()

    def call(self, method: str, timeout: float | None = None, **args):
        result = self.conn.call("shim", method, args, timeout=timeout)
        if method in ("create", "start") and result and result.get("pid"):
            self.container_pids.add(result["pid"])
        return result

    def delete(self) -> dict:
        """Delete the task; the shim exits once it has answered."""
        result = self.call("delete")
        wait_until(lambda: not pid_alive(self.pid), 10, what=f"shim {self.pid} to exit after delete")
        return result


class Harness:
    """A zygote wired to the test's berthd, bundles, FIFOs, and the cleanup of all of it."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.work = tempfile.mkdtemp(prefix="berth-shim-", dir="/tmp")
        self.image = os.path.join(self.work, "image")
        self.zygote = Zygote.fork(SimpleNamespace(address=daemon.address, state=daemon.state, log_level="debug"))
        self.shims: list[Shim] = []
        self.cgroups: list[str] = []

    def bundle(self, name: str, args: list[str], terminal: bool = False, pid_namespace: bool = True,
               memory_limit: int | None = None) -> str:
        if not os.path.isdir(self.image):
            shutil.copytree(build_busybox_image(), self.image)
        path = os.path.join(self.work, f"bundle-{name}")
        subprocess.run(["umoci", "unpack", "--image", f"{self.image}:latest", path],
                       check=True, capture_output=True, timeout=60)
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["process"]["args"] = args
        config["process"]["terminal"] = terminal
        cgroup = f"/berth-test-{uuid.uuid4().hex[:12]}"
        self.cgroups.append(cgroup)
        config["linux"]["cgroupsPath"] = cgroup
        if not pid_namespace:
            config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "pid"]
        if memory_limit:
            config["linux"].setdefault("resources", {})["memory"] = {"limit": memory_limit, "swap": memory_limit}
        with open(config_path, "w") as f:
            json.dump(config, f)
        return path

    def cgroup_of(self, bundle: str) -> str:
        with open(os.path.join(bundle, "config.json")) as f:
            return json.load(f)["linux"]["cgroupsPath"]

    def fifo(self, name: str) -> str:
        path = os.path.join(self.work, name)
        os.mkfifo(path, 0o600)
        return path

    def spawn(self, id: str, bundle: str, runtime: str = "runc", ns: str = NS) -> Shim:
        task_dir = os.path.join(self.work, "tasks", ns, id)
        os.makedirs(task_dir, mode=0o700)
        pid = self.zygote.spawn(ns, id, bundle, task_dir, runtime)
        shim = Shim(pid, ns, id, task_dir, runtime, os.path.join(self.daemon.state, runtime, ns))
        self.shims.append(shim)
        return shim

    def events(self, container_id: str, daemon=None) -> list[tuple[str, dict]]:
        client = (daemon or self.daemon).client()
        try:
            return [(e["topic"], e["event"]) for e in client.events.replay(0)
                    if e["topic"].startswith("/tasks/") and e["event"].get("container_id") == container_id]
        finally:
            client.close()

    def wait_events(self, container_id: str, topics: list[str], daemon=None) -> list[tuple[str, dict]]:
        """The task's events once there are as many as expected; they must be those, in order."""
        events = wait_until(lambda: (lambda ev: ev if len(ev) >= len(topics) else None)(
            self.events(container_id, daemon)), 15, what=f"events {topics} of {container_id}")
        assert [t for t, _ in events] == topics, events
        return events

    def cleanup(self) -> None:
        for shim in self.shims:
            if pid_alive(shim.pid):
                try:
                    shim.call("ping", timeout=2)
                    shim.call("shutdown", timeout=10, force=True)
                    wait_until(lambda: not pid_alive(shim.pid), 5, what="the shim to exit")
                except Exception:
                    _kill(shim.pid)
            shim.conn.close()
            for pid in shim.container_pids:
                _kill(pid)
            subprocess.run(command(shim.runtime, shim.runtime_root, "delete", "--force", shim.id),
                           capture_output=True, timeout=30)
        for cgroup in self.cgroups:
            for controller in os.listdir(CGROUP_V1):
                path = os.path.join(CGROUP_V1, controller, cgroup.lstrip("/"))
                if not os.path.isdir(path):
                    continue
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        _kill(int(pid))
                wait_until(lambda: _rmdir(path), 10, what=f"removing cgroup {path}")
        self.zygote.close()
        shutil.rmtree(self.work, ignore_errors=True)


def _kill(pid: int) -> None:
    """SIGKILL one process by pid, if it is still there."""
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def harness(daemon):
    h = Harness(daemon)
    yield h
    h.cleanup()


def runtime_ids(shim: Shim) -> list[str]:
    out = subprocess.run(command(shim.runtime, shim.runtime_root, "list", "-q"),
                         capture_output=True, text=True, timeout=30)
    return out.stdout.split()


# --- the shim process -------------------------------------------------------------------------

def test_spawn_detaches_the_shim_from_whoever_spawned_it(harness, daemon):
    # Whatever the spawning process holds (berthd's directory lock, say) must not reach the shim.
    lock_path = os.path.join(harness.work, "berthd.lock")
    lock = open(lock_path, "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    harness.zygote.close()
    harness.zygote = Zygote.fork(SimpleNamespace(address=daemon.address, state=daemon.state, log_level="debug"))
    bundle = harness.bundle("d", ["true"])
    shim = harness.spawn("detached", bundle)
    lock.close()
    with open(lock_path) as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)       # nobody else holds it

    assert proc_title(shim.pid) == "berth-shim: ns/detached"
    fields = stat_fields(shim.pid)
    ppid, pgrp, session = int(fields[1]), int(fields[2]), int(fields[3])
    assert ppid not in (os.getpid(), harness.zygote.pid)          # double-forked away
    assert session not in (os.getsid(0), harness.zygote.pid, shim.pid)  # a session of its own, not a leader
    assert pgrp == session
    status = proc_status(shim.pid)
    # Dispositions reset (Python keeps SIGPIPE ignored). glibc's own signals 32 and 33 cannot be
    # set from Python, so whatever the test runner inherited for them is left out of the check.
    settable = sum(1 << (int(sig) - 1) for sig in signal.valid_signals())
    assert int(status["SigIgn"], 16) & settable == 1 << (signal.SIGPIPE - 1)
    assert int(status["SigBlk"], 16) == 0
    fds = open_files(shim.pid)
    assert not any(link.endswith("berthd.lock") for link in fds), fds
    assert "/dev/null" in fds and os.path.join(shim.task_dir, "shim.log") in fds
    with open(os.path.join(shim.task_dir, "shim.pid")) as f:
        assert int(f.read()) == shim.pid
    with open(os.path.join(shim.task_dir, "shim.json")) as f:
        info = json.load(f)
    assert info["namespace"] == "ns" and info["id"] == "detached" and info["address"] == daemon.address
    assert os.stat(os.path.join(shim.task_dir, "shim.sock")).st_mode & 0o777 == 0o600
    assert shim.call("ping")["pid"] == shim.pid
    assert shim.call("state")["status"] == "new"
    shim.call("shutdown")
    wait_until(lambda: not pid_alive(shim.pid), 10, what="the shim to exit after shutdown")


def test_bad_requests_are_refused_clearly(harness):
    bundle = harness.bundle("bad", ["true"])
    with pytest.raises(InvalidArgument, match="failed to start: OCI runtime 'no-such-runtime' not found"):
        harness.spawn("noruntime", bundle, runtime="no-such-runtime")
    with pytest.raises(InvalidArgument, match="has no config.json"):
        harness.spawn("nobundle", os.path.join(harness.work, "nowhere"))
    shim = harness.spawn("bad", bundle)
    with pytest.raises(InvalidArgument, match="process.terminal=false"):
        shim.call("create", terminal=True)
    with pytest.raises(FailedPrecondition, match="task bad is new, cannot become running"):
        shim.call("start")
    with pytest.raises(FailedPrecondition, match="has not been created"):
        shim.call("wait")
    with pytest.raises(FailedPrecondition, match="cannot exec a process in task bad: it is new"):
        shim.call("exec", exec_id="e1", spec={"args": ["true"]})
    with pytest.raises(InvalidArgument, match="exec_id"):
        shim.call("exec", exec_id="bad id", spec={"args": ["true"]})
    with pytest.raises(InvalidArgument, match="signal"):
        shim.call("kill", signal=0)
    with pytest.raises(InvalidArgument, match="absolute"):
        shim.call("create", stdout="relative/out")
    with pytest.raises(NotFound):
        shim.call("wait", exec_id="nope")
    assert shim.call("state")["status"] == "new"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_to_exit_then_delete(harness, runtime):
    bundle = harness.bundle(runtime, ["sh", "-c", "echo hi; exit 7"])
    cgroup = harness.cgroup_of(bundle)
    shim = harness.spawn(f"run-{runtime}", bundle, runtime)
    out = harness.fifo("out")
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pid = shim.call("create", stdout=out, stderr=out)["pid"]
        assert shim.call("state")["status"] == "created"
        assert os.path.isdir(os.path.join(CGROUP_V1, "memory", cgroup.lstrip("/")))   # v1 cgroups, crun too
        assert shim.call("start") == {"pid": pid}
        exit = shim.call("wait", timeout=30)
        assert exit["exit_status"] == 7 and exit["pid"] == pid and exit["exited_at"] > 0
        assert read_until_eof(reader) == b"hi\n"
    finally:
        os.close(reader)
    state = shim.call("state")
    assert (state["status"], state["exit_status"], state["pid"]) == ("stopped", 7, pid)
    with open(os.path.join(shim.task_dir, "exit-init.json")) as f:
        assert json.load(f) == {"container_id": shim.id, "exec_id": "", "pid": pid, "exit_status": 7,
                                "exited_at": exit["exited_at"]}
    events = harness.wait_events(shim.id, ["/tasks/create", "/tasks/start", "/tasks/exit"])
    assert events[0][1] == {"container_id": shim.id, "bundle": bundle, "pid": pid}
    assert events[1][1] == {"container_id": shim.id, "pid": pid}
    assert events[2][1] == {"container_id": shim.id, "id": shim.id, "pid": pid, "exit_status": 7,
                            "exited_at": exit["exited_at"]}
    assert shim.call("wait") == exit                              # an exited process answers at once
    with pytest.raises(NotFound, match="already exited"):
        shim.call("kill", signal=9)
    assert runtime_ids(shim) == [shim.id]

    assert shim.call("delete") == exit
    harness.wait_events(shim.id, ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"])
    assert harness.events(shim.id)[3][1] == {"container_id": shim.id, "pid": pid, "exit_status": 7,
                                             "exited_at": exit["exited_at"]}
    wait_until(lambda: not pid_alive(shim.pid), 10, what="the shim to exit after delete")
    assert runtime_ids(shim) == []
    assert not os.path.exists(os.path.join(CGROUP_V1, "memory", cgroup.lstrip("/")))
    assert not os.path.exists(os.path.join(shim.task_dir, "shim.sock"))
    assert os.listdir(os.path.join(shim.task_dir, "spool")) == []


@needs_crun
@pytest.mark.needs_crun
@pytest.mark.skipif(not hybrid_cgroups(), reason="not a hybrid cgroup host")
def test_bare_crun_refuses_this_hybrid_host(harness):
    """What the crun run above proves: crun alone cannot create a container here."""
    bundle = harness.bundle("bare-crun", ["true"])
    root = os.path.join(harness.work, "bare-crun-root")
    result = subprocess.run(["crun", "--root", root, "create", "--bundle", bundle, "bare"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "hybrid" in result.stderr, result.stderr
    assert subprocess.run(["crun", "--root", root, "list", "-q"], capture_output=True, text=True).stdout == ""


def test_kill_with_sigkill_and_sigterm(harness):
    bundle = harness.bundle("kill", ["sleep", "1000"])
    shim = harness.spawn("kill", bundle)
    pid = shim.call("create")["pid"]
    shim.call("start")
    # An exec is not its pid namespace's init, so SIGTERM's default action applies: 128 + 15.
    shim.call("exec", exec_id="sleeper", spec={"args": ["sleep", "1000"]})
    exec_pid = shim.call("start", exec_id="sleeper")["pid"]
    shim.container_pids.add(exec_pid)
    shim.call("kill", signal=signal.SIGTERM, exec_id="sleeper")
    assert shim.call("wait", exec_id="sleeper", timeout=30)["exit_status"] == 143
    shim.call("kill", signal=signal.SIGKILL)
    exit = shim.call("wait", timeout=30)
    assert exit["exit_status"] == 137 and exit["pid"] == pid
    assert not pid_alive(pid)
    shim.delete()


def test_sigterm_reaches_an_init_outside_a_pid_namespace_and_output_goes_to_a_log(harness):
    bundle = harness.bundle("hostpid", ["sh", "-c", "echo to-log; echo to-log-too >&2; exec sleep 1000"],
                            pid_namespace=False)
    shim = harness.spawn("hostpid", bundle)
    log_path = os.path.join(harness.work, "hostpid.log")
    shim.call("create", log_path=log_path)
    shim.call("start")
    wait_until(lambda: os.path.exists(log_path) and b"to-log-too" in open(log_path, "rb").read(), 10,
               what="the container's output in its log file")
    shim.call("kill", signal=signal.SIGTERM)
    assert shim.call("wait", timeout=30)["exit_status"] == 143
    with open(log_path, "rb") as f:
        assert sorted(f.read().split()) == [b"to-log", b"to-log-too"]
    shim.delete()


def test_exec_output_and_its_exit_before_the_inits(harness):
    bundle = harness.bundle("exec", ["sleep", "1000"])
    shim = harness.spawn("exec", bundle)
    init_pid = shim.call("create")["pid"]
    shim.call("start")
    out = harness.fifo("exec-out")
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    try:
        shim.call("exec", exec_id="e1", spec={"args": ["echo", "from-exec"]}, stdout=out)
        assert shim.call("state")["execs"]["e1"]["status"] == "created"
        e1_pid = shim.call("start", exec_id="e1")["pid"]
        e1 = shim.call("wait", exec_id="e1", timeout=30)
        assert e1["exit_status"] == 0 and e1["pid"] == e1_pid
        assert read_until_eof(reader) == b"from-exec\n"
    finally:
        os.close(reader)
    with open(os.path.join(shim.task_dir, "exit-e1.json")) as f:
        assert json.load(f)["exit_status"] == 0
    assert shim.call("delete", exec_id="e1") == {"id": "e1", "pid": e1_pid, "exit_status": 0,
                                                "exited_at": e1["exited_at"]}
    assert not os.path.exists(os.path.join(shim.task_dir, "exit-e1.json"))

    # stdin: the container reads EOF only once the client has closed its end and asked close_io.
    stdin, out = harness.fifo("cat-in"), harness.fifo("cat-out")
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    try:
        shim.call("exec", exec_id="cat", spec={"args": ["cat"]}, stdin=stdin, stdout=out)
        shim.call("start", exec_id="cat")
        with open(stdin, "wb") as writer:
            writer.write(b"through-stdin\n")
        assert read_until(reader, lambda data: data.endswith(b"through-stdin\n")) == b"through-stdin\n"
        assert shim.call("state")["execs"]["cat"]["status"] == "running"     # the shim still holds stdin
        shim.call("close_io", exec_id="cat")
        assert shim.call("wait", exec_id="cat", timeout=30)["exit_status"] == 0
    finally:
        os.close(reader)
    shim.call("delete", exec_id="cat")

    shim.call("exec", exec_id="e2", spec={"args": ["sleep", "1000"]})
    e2_pid = shim.call("start", exec_id="e2")["pid"]
    shim.container_pids.add(e2_pid)
    pids = {p["pid"]: p["exec_id"] for p in shim.call("pids")}
    assert pids[init_pid] == "" and pids[e2_pid] == "e2"
    shim.call("kill", signal=signal.SIGKILL)                       # the pid namespace takes e2 with it
    assert shim.call("wait", timeout=30)["exit_status"] == 137
    assert shim.call("wait", exec_id="e2")["exit_status"] == 137
    events = harness.wait_events(shim.id, [
        "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit", "/tasks/exit"])
    assert events[2][1] == {"container_id": shim.id, "exec_id": "e1"}
    assert events[3][1] == {"container_id": shim.id, "exec_id": "e1", "pid": e1_pid}
    assert [e["id"] for t, e in events if t == "/tasks/exit"] == ["e1", "cat", "e2", shim.id]
    shim.delete()


def test_pause_resume_pids_and_stats(harness):
    bundle = harness.bundle("pause", ["sleep", "1000"])
    freezer = os.path.join(CGROUP_V1, "freezer", harness.cgroup_of(bundle).lstrip("/"), "freezer.state")
    shim = harness.spawn("pause", bundle)
    pid = shim.call("create")["pid"]
    shim.call("start")
    assert [p["pid"] for p in shim.call("pids")] == [pid]
    stats = shim.call("stats")
    assert stats["memory"]["usage"] > 0 and stats["memory"]["limit"] > 0
    assert stats["pids"]["current"] == 1
    assert stats["cpu"]["usage_ns"] > 0

    shim.call("pause")
    with open(freezer) as f:
        assert f.read().strip() == "FROZEN"
    assert shim.call("state")["status"] == "paused"
    with pytest.raises(FailedPrecondition, match="is paused, cannot become paused"):
        shim.call("pause")
    shim.call("resume")
    with open(freezer) as f:
        assert f.read().strip() == "THAWED"
    assert shim.call("state")["status"] == "running"
    shim.call("update", resources={"pids": {"limit": 50}})
    assert shim.call("stats")["pids"]["limit"] == 50
    with pytest.raises(FailedPrecondition, match="kill it and wait"):
        shim.call("delete")
    shim.call("kill", signal=signal.SIGKILL)
    shim.call("wait", timeout=30)
    harness.wait_events(shim.id, ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed",
                                  "/tasks/exit"])
    shim.delete()


def test_a_terminal_container(harness):
    bundle = harness.bundle("tty", ["sh"], terminal=True)
    shim = harness.spawn("tty", bundle)
    stdin, stdout = harness.fifo("tty-in"), harness.fifo("tty-out")
    reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    try:
        shim.call("create", stdin=stdin, stdout=stdout, terminal=True)
        writer = os.open(stdin, os.O_WRONLY)
        try:
            shim.call("start")
            shim.call("resize_pty", width=100, height=30)
            os.write(writer, b"echo tty-ok\n")
            read_until(reader, lambda data: b"\ntty-ok\r\n" in data)
            os.write(writer, b"stty size\n")
            read_until(reader, lambda data: b"\n30 100\r\n" in data)
            os.write(writer, b"exit 3\n")
            assert shim.call("wait", timeout=30)["exit_status"] == 3
        finally:
            os.close(writer)
    finally:
        os.close(reader)
    shim.delete()


def test_oom_is_reported(harness):
    bundle = harness.bundle("oom", ["sh", "-c", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"],
                            memory_limit=16 << 20)
    shim = harness.spawn("oom", bundle)
    shim.call("create")
    shim.call("start")
    assert shim.call("wait", timeout=60)["exit_status"] == 137
    wait_until(lambda: any(t == "/tasks/oom" for t, _ in harness.events(shim.id)), 15, what="an OOM event")
    shim.delete()


# --- surviving berthd -------------------------------------------------------------------------

SPAWNER = """
import json, sys
from types import SimpleNamespace
from shimd.zygote import Zygote
args = json.loads(sys.argv[1])
zygote = Zygote.fork(SimpleNamespace(address=args["address"], state=args["state"], log_level="debug"))
pid = zygote.spawn("ns", args["id"], args["bundle"], args["task_dir"], "runc")
print(json.dumps({"shim": pid, "zygote": zygote.pid}), flush=True)
sys.stdin.read()
"""


def test_the_shim_outlives_the_process_that_spawned_it(harness, daemon):
    bundle = harness.bundle("orphan", ["sleep", "1000"])
    task_dir = os.path.join(harness.work, "tasks", NS, "orphan")
    os.makedirs(task_dir, mode=0o700)
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, json.dumps({"address": daemon.address, "state": daemon.state, "id": "orphan",
                                                    "bundle": bundle, "task_dir": task_dir})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        started = json.loads(spawner.stdout.readline())
        shim = Shim(started["shim"], NS, "orphan", task_dir, "runc", os.path.join(daemon.state, "runc", NS))
        harness.shims.append(shim)
        pid = shim.call("create")["pid"]
        shim.call("start")
    finally:
        spawner.kill()                            # SIGKILL: the "runtime actor" and its zygote go
        spawner.wait()
    wait_until(lambda: not pid_alive(started["zygote"]), 10, what="the zygote to die with its parent")
    assert pid_alive(shim.pid) and pid_alive(pid)
    assert shim.call("state")["status"] == "running"
    shim.call("kill", signal=signal.SIGKILL)
    assert shim.call("wait", timeout=30)["exit_status"] == 137
    shim.delete()


def test_exit_events_wait_for_berthd_and_arrive_once(harness, daemon, make_daemon):
    bundle = harness.bundle("spool", ["sleep", "1000"])
    shim = harness.spawn("spool", bundle)
    shim.call("create")
    shim.call("start")
    harness.wait_events(shim.id, ["/tasks/create", "/tasks/start"])
    spool = os.path.join(shim.task_dir, "spool")
    wait_until(lambda: os.listdir(spool) == [], 10, what="create and start to be acknowledged")
    daemon.stop()
    shim.call("kill", signal=signal.SIGKILL)
    exit = shim.call("wait", timeout=30)                           # the shim answers without berthd
    assert exit["exit_status"] == 137
    assert len(os.listdir(spool)) == 1                             # the exit, waiting on disk

    again = make_daemon(dir=daemon.dir).start()
    wait_until(lambda: os.listdir(spool) == [], 15, what="the spooled exit to be acknowledged")
    events = harness.wait_events(shim.id, ["/tasks/create", "/tasks/start", "/tasks/exit"], daemon=again)
    assert events[2][1]["exit_status"] == 137
    shim.delete()
    harness.wait_events(shim.id, ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], daemon=again)


@pytest.mark.needs_criu
@pytest.mark.skipif(not criu_works(), reason="`criu check` fails on this host")
def test_checkpoint_and_restore(harness):
    bundle = harness.bundle("cr", ["sh", "-c", "i=0; while true; do i=$((i+1)); sleep 0.1; done"])
    shim = harness.spawn("cr", bundle)
    shim.call("create")
    shim.call("start")
    image = os.path.join(harness.work, "checkpoint")
    shim.call("checkpoint", path=image, exit=True)
    assert shim.call("wait", timeout=60)["exit_status"] is not None
    shim.delete()
    restored = harness.spawn("cr2", bundle)
    restored.call("create", checkpoint=image)
    restored.call("start")
    assert restored.call("state")["status"] == "running"
    restored.call("kill", signal=signal.SIGKILL)
    restored.call("wait", timeout=30)
    restored.delete()
