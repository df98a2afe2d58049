"""`berth run` end to end: a real berthd, busybox pulled from a real registry, runc (and crun).

Each test works in a namespace of its own (`t<random>`), so its containers' cgroups are
`/<namespace>/<id>` under every controller and cannot meet those of a test running beside it.
The `berth` fixture is shared with test_tasks.py and test_restart_tasks.py: it pulls busybox,
and afterwards removes whatever a test left: tasks through the API first, then by force (shims
killed by pid, the runtimes' state, mounts under the daemon's directory, the namespace's cgroups).
"""
from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.support import REPO, pid_alive, proc_title, wait_until

CGROUP_V1 = "/sys/fs/cgroup"
CGROUP_MOUNT = "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev"
needs_crun = pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed")


def unique(prefix: str = "c") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def mounts_under(path: str) -> list[str]:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p == path or p.startswith(path + "/")), key=len, reverse=True)


class Berth:
    """One test's berthd, namespace and image, and the cleanup of all it made."""

    def __init__(self, daemon, registry, busybox_image):
        self.daemon = daemon
        self.ns = unique("t")
        registry.push(busybox_image, "busybox:latest")
        self.client = daemon.client(self.ns, timeout=60)
        self.image = self.client.pull(f"{registry.host}/busybox:latest", plain_http=True)["name"]

    @property
    def state(self) -> str:
        return self.daemon.state

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.daemon.cli(*args, namespace=self.ns, **kw)

    def task_dir(self, cid: str) -> str:
        return os.path.join(self.state, "tasks", self.ns, cid)

    def cgroup(self, controller: str, cid: str) -> str:
        return os.path.join(CGROUP_V1, controller, self.ns, cid)

    def events(self, since: int = 0, cid: str | None = None) -> list[tuple[str, dict]]:
        return [(e["topic"], e["event"]) for e in self.client.events.replay(since)
                if e["topic"].startswith("/tasks/") and e.get("namespace") == self.ns
                and (cid is None or e["event"].get("container_id") == cid)]

    def runtime_ids(self, runtime: str = "runc") -> list[str]:
        root = os.path.join(self.state, runtime, self.ns)
        if not os.path.isdir(root):
            return []
        from shimd.runtime_cli import command
        out = subprocess.run(command(runtime, root, "list", "-q"), capture_output=True, text=True, timeout=30)
        return out.stdout.split()

    def assert_gone(self, cid: str) -> None:
        """Nothing of the task is left: directory, mounts, runtime state, cgroups."""
        wait_until(lambda: not os.path.exists(self.task_dir(cid)), 15, what=f"{cid}'s task directory to go")
        assert not mounts_under(self.task_dir(cid))
        assert cid not in self.runtime_ids()
        assert not os.path.exists(self.cgroup("memory", cid))

    def cleanup(self) -> None:
        from bus.errors import BerthError
        self.client.close()
        client = self.daemon.client(self.ns, timeout=10)
        try:
            for task in client.tasks.list():
                try:
                    t = client.tasks.get(task["container_id"])
                    if task["status"] not in ("stopped",):
                        t.kill(signal.SIGKILL, all=True)
                    t.wait(timeout=15)
                    t.delete()
                except BerthError:
                    pass
            for c in client.containers.list():
                try:
                    client.containers.load(c["id"]).delete(snapshot=True, check_task=False)
                except BerthError:
                    pass
        except BerthError:
            pass
        finally:
            client.close()
        self._force()

    def _force(self) -> None:
        """Whatever the API could not remove: by pid, by the runtimes' own delete, by umount."""
        tasks = os.path.join(self.state, "tasks", self.ns)
        for cid in os.listdir(tasks) if os.path.isdir(tasks) else []:
            try:
                with open(os.path.join(tasks, cid, "shim.pid")) as f:
                    pid = int(f.read())
            except (FileNotFoundError, ValueError):
                continue
            if proc_title(pid) == f"berth-shim: {self.ns}/{cid}":
                os.kill(pid, signal.SIGKILL)
        from shimd.runtime_cli import command
        for runtime in ("runc", "crun"):
            root = os.path.join(self.state, runtime, self.ns)
            for cid in os.listdir(root) if os.path.isdir(root) else []:
                subprocess.run(command(runtime, root, "delete", "--force", cid), capture_output=True, timeout=60)
        for point in mounts_under(self.daemon.dir):
            subprocess.run(["umount", "-l", point], capture_output=True)
        for controller in os.listdir(CGROUP_V1):
            top = os.path.join(CGROUP_V1, controller, self.ns)
            if not os.path.isdir(top) or os.path.islink(os.path.join(CGROUP_V1, controller)):
                continue
            for path in sorted((os.path.join(d, n) for d, dirs, _ in os.walk(top) for n in dirs),
                               key=len, reverse=True) + [top]:
                wait_until(lambda: _rmdir_cgroup(path), 15, what=f"removing cgroup {path}")


def _rmdir_cgroup(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                if pid_alive(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def berth(daemon, registry, busybox_image):
    b = Berth(daemon, registry, busybox_image)
    yield b
    b.cleanup()


def run(berth: Berth, *args: str, cid: str | None = None, **kw) -> subprocess.CompletedProcess:
    """`berth run --rm [FLAGS] IMAGE ID [ARGS]`: flags are the leading words that start with '-'."""
    words = list(args)
    flags = []
    while words and words[0].startswith("-"):
        flags.append(words.pop(0))
        if flags[-1] in ("--env", "--mount", "--cwd", "--user", "-u", "--memory-limit", "--cpus", "--runtime"):
            flags.append(words.pop(0))
    return berth.cli("run", "--rm", *flags, berth.image, cid or unique(), *words, **kw)


# --- the basics ---------------------------------------------------------------------------------

def test_run_prints_the_output_and_exits_with_the_containers_status(berth):
    cid = unique()
    result = run(berth, "echo", "hi", cid=cid)
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")
    assert run(berth, "sh", "-c", "exit 7", check=False).returncode == 7
    result = run(berth, "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert run(berth, "cat", input="through stdin\n").stdout == "through stdin\n"
    # --rm: no record, no snapshot, no task directory, nothing mounted, no runtime state, no cgroup.
    berth.assert_gone(cid)
    assert berth.cli("containers", "ls", "-q").stdout.split() == []
    assert cid not in berth.cli("snapshots", "ls", "-q").stdout.split()
    assert berth.cli("leases", "ls", "-q").stdout.split() == []
    assert [t for t, _ in berth.events(cid=cid)] == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                                    "/tasks/delete"]


def test_env_working_directory_and_user(berth):
    script = 'echo "$GREETING"; pwd; id -u; id -g'
    result = run(berth, "--env", "GREETING=hello there", "--cwd", "/tmp", "--user", "65534", "sh", "-c", script)
    assert result.stdout.splitlines() == ["hello there", "/tmp", "65534", "65534"]
    # A name is looked up in the image's /etc/passwd.
    assert run(berth, "--user", "nobody", "id", "-u").stdout == "65534\n"
    assert run(berth, "id", "-u").stdout == "0\n"
    missing = run(berth, "--user", "nosuchuser", "true", check=False)
    assert missing.returncode == 1 and "nosuchuser" in missing.stderr
    assert berth.cli("containers", "ls", "-q").stdout.split() == []      # nothing left by the failure


def test_a_bind_mount_is_visible_inside(berth):
    host = tempfile.mkdtemp(prefix="berth-bind-")
    try:
        with open(os.path.join(host, "note.txt"), "w") as f:
            f.write("from the host\n")
        mount = f"type=bind,src={host},dst=/data,options=rbind:ro"
        assert run(berth, "--mount", mount, "cat", "/data/note.txt").stdout == "from the host\n"
        denied = run(berth, "--mount", mount, "touch", "/data/new", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    finally:
        shutil.rmtree(host)


def _interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line}


def test_net_host_shares_the_hosts_interfaces(berth):
    with open("/proc/net/dev") as f:
        host = _interfaces(f.read())
    assert _interfaces(run(berth, "--net-host", "cat", "/proc/net/dev").stdout) == host
    assert _interfaces(run(berth, "cat", "/proc/net/dev").stdout) == {"lo"}


def test_read_only_rootfs(berth):
    result = run(berth, "--read-only", "touch", "/x", check=False)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert run(berth, "touch", "/x").returncode == 0


def test_memory_limit_and_cpus(berth):
    limit = 64 << 20
    out = run(berth, "--memory-limit", str(limit), "--cpus", "0.5", "--mount", CGROUP_MOUNT, "sh", "-c",
              "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us").stdout
    assert out.split() == [str(limit), "50000"]


@needs_crun
@pytest.mark.needs_crun
def test_crun_runs_it_too(berth):
    cid = unique()
    result = run(berth, "--runtime", "crun", "echo", "hi", cid=cid)
    assert (result.returncode, result.stdout) == (0, "hi\n")
    assert run(berth, "--runtime", "crun", "sh", "-c", "exit 5", check=False).returncode == 5
    berth.assert_gone(cid)
    assert berth.runtime_ids("crun") == []


def test_tty_through_a_pty(berth):
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "berth.cli.main", "-a", berth.daemon.address, "-n", berth.ns,
           "run", "--rm", "-t", berth.image, unique(), "sh", "-c", "tty; stty size; exit 4"]
    import fcntl
    import struct
    import termios
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=berth.daemon.env, cwd=REPO,
                            start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:              # EIO: every slave end is closed
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 4, output
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode(errors="replace")
    assert "/dev/pts/" in text and "33 111" in text, text


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_refused_clearly_and_berthd_keeps_serving(berth):
    def refused(*args, words=()):
        result = berth.cli(*args, check=False)
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("berth: "), result.stderr
        for word in words:
            assert word in lines[0], lines[0]
        return lines[0]

    refused("run", "--rm", berth.image, "../escape", "true", words=["not valid"])
    refused("run", "--rm", berth.image, "x" * 77, "true", words=["longer than 76"])
    # A valid id that makes the shim's socket path too long: refused before anything runs.
    long_id = "y" * 76
    refused("run", "--rm", berth.image, long_id, "true", words=["socket", "too long"])
    assert not os.path.exists(berth.task_dir(long_id))
    refused("run", "--rm", "example.com/missing:1", unique(), "true", words=["not found"])
    refused("run", "--rm", berth.image, unique(), "/no/such/binary", words=["no/such/binary"])
    assert berth.cli("containers", "ls", "-q").stdout.split() == []

    cid = unique()
    berth.cli("run", "-d", berth.image, cid, "sleep", "1000")
    refused("tasks", "start", "-d", cid, words=["already has a task"])
    with pytest.raises(Exception, match="already has a task"):
        berth.client.containers.load(cid).new_task()
    refused("run", berth.image, cid, "true", words=["already exists"])
    refused("containers", "rm", cid, words=["has a task"])
    refused("tasks", "rm", cid, words=["kill it"])
    refused("tasks", "kill", "-s", "NOSUCH", cid, words=["unknown signal"])
    refused("tasks", "wait", "nosuchtask", words=["not found"])
    assert berth.cli("tasks", "ls", "-q").stdout.split() == [cid]
    berth.cli("tasks", "kill", "-s", "9", cid)
    assert berth.cli("tasks", "wait", cid, check=False).returncode == 137
    berth.cli("tasks", "rm", cid)
    berth.cli("containers", "rm", cid)
    assert run(berth, "echo", "still serving").stdout == "still serving\n"


def test_containers_create_then_tasks_start(berth):
    cid = unique()
    berth.cli("containers", "create", "--env", "WHO=world", berth.image, cid, "sh", "-c", 'echo "hello $WHO"')
    info = json.loads(berth.cli("containers", "info", cid).stdout)
    assert info["snapshot_key"] == cid and info["spec"]["process"]["args"][0] == "sh"
    # The lease that held the snapshot until the record existed went with the record's creation;
    # the record holds the snapshot against GC now.
    assert berth.cli("leases", "ls", "-q").stdout.split() == []
    berth.cli("gc")
    assert cid in berth.cli("snapshots", "ls", "-q").stdout.split()
    assert berth.cli("tasks", "start", cid).stdout == "hello world\n"
    assert berth.cli("tasks", "ls", "-q").stdout.split() == []
    berth.cli("containers", "rm", cid)
    assert cid not in berth.cli("snapshots", "ls", "-q").stdout.split()
