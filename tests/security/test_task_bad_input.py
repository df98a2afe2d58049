"""Hostile input to the tasks service through a real berthd and runc (and crun).

Bad ids and names, a second task for one container, a missing image, a flood of failing execs,
and images built to reach the host: an /etc/passwd that is endless or no file at all, a WORKDIR
through /proc/self/fd, a /dev that is a symlink out of the root. Each case gets a clear error
with its code from bus/errors.py, leaves the host as it was, and berthd keeps serving (a
`berth run --rm busybox echo ok` works after it).

The `berth` fixture (tests/integration/test_run.py) gives each test a namespace of its own with
busybox pulled, and removes whatever the test left. The hostile images are busybox with one more
layer (and config), built with umoci once per session and pushed to each test's registry.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import threading
import time

import pytest

from actors.runtime import MAX_SOCKET_PATH
from berth import oci
from berth.client import Stdio
from bus.errors import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound
from tests.integration import test_run
from tests.integration.test_run import unique
from tests.registry import build_busybox_image, run
from tests.support import proc_title, rss_kib, wait_until

berth = test_run.berth             # the fixture

USER = "someone"                   # a user no image here has, looked up by name
RUNC_DEV_LINKS = ("fd", "stdin", "stdout", "stderr", "ptmx", "kcore")   # what runc makes in /dev
MiB = 1024                         # rss_kib counts KiB


# --- helpers ------------------------------------------------------------------------------------

def still_serving(berth) -> None:
    result = berth.cli("run", "--rm", berth.image, unique(), "echo", "ok")
    assert (result.returncode, result.stdout) == (0, "ok\n"), result


def refused_clearly(result, *words: str) -> str:
    """The CLI's one-line error, with each of `words` in it."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("berth: "), result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


def mounts_mentioning(path: str) -> list[str]:
    """Mount table lines that name `path` anywhere: as mount point, source or overlay layer."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if path in line]


def assert_nothing_left(berth, cid: str) -> None:
    """No record, snapshot, task directory, runtime state or mount of `cid` (nor any mount of
    this daemon's: no task of the test runs when this is called)."""
    assert cid not in berth.cli("containers", "ls", "-q").stdout.split()
    assert cid not in berth.cli("snapshots", "ls", "-q").stdout.split()
    assert not os.path.lexists(berth.task_dir(cid))
    assert cid not in berth.runtime_ids("runc") + berth.runtime_ids("crun")
    assert mounts_mentioning(berth.daemon.dir) == []


def spec_for(berth, cid: str) -> dict:
    """A valid spec (for requests where only the id should be wrong)."""
    return oci.generate(berth.ns, cid, oci.with_process_args("true"))


def shim_pid(berth, cid: str) -> int:
    with open(os.path.join(berth.task_dir(cid), "shim.pid")) as f:
        return int(f.read())


def runtime_actor_pid(berth) -> int:
    return next(a["pid"] for a in berth.client.actors()["actors"] if a["name"] == "runtime")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_detached(berth, cid: str) -> None:
    berth.cli("run", "-d", berth.image, cid, "sleep", "1000")


# --- hostile images -----------------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", linkname: str = "",
           device: tuple[int, int] = (0, 0), mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, mode, 1700000000
    info.devmajor, info.devminor = device
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def build_on_busybox(layout: str, members: list, config: tuple[str, ...] = (),
                     user_tag: str | None = None) -> str:
    """busybox (tests.registry) with a layer of `members` on top and `config` (umoci config
    flags) applied as tag "latest"; with `user_tag`, a tag "user" whose config also says
    User=`user_tag`."""
    shutil.copytree(build_busybox_image(), layout, symlinks=True)
    image = f"{layout}:latest"
    if members:
        layer = layout + ".tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        run("umoci", "raw", "add-layer", "--image", image, "--history.created_by", "berth test", layer)
        os.unlink(layer)
    if config:
        run("umoci", "config", "--image", image, *config)
    if user_tag:
        run("umoci", "config", "--image", image, "--tag", "user", "--config.user", user_tag)
    return layout


PASSWD_LINE = b"someone:x:1000:1000::/home:/bin/sh\n"

# /etc/passwd (or /etc itself) made to hang, exhaust or escape the lookup of a user by name.
HOSTILE_PASSWD = {
    # If followed, an endless device: the image ships a real /dev/zero for it to reach.
    "passwd-symlink-to-dev-zero": [member("dev/zero", tarfile.CHRTYPE, device=(1, 5), mode=0o666),
                                   member("etc/passwd", tarfile.SYMTYPE, linkname="/dev/zero")],
    "passwd-fifo": [member("etc/passwd", tarfile.FIFOTYPE)],
    "passwd-character-device": [member("etc/passwd", tarfile.CHRTYPE, device=(1, 5), mode=0o666)],
    "passwd-over-the-size-cap": [member("etc/passwd",
                                        data=PASSWD_LINE * (oci.MAX_ID_FILE // len(PASSWD_LINE) + 1))],
    # Resolved inside the root, `..` stops at its top: /etc leads to itself, a loop. Followed
    # on the host, it would be the host's /etc.
    "etc-symlink-out-of-the-root": [member("etc", tarfile.SYMTYPE, linkname="../" * 16 + "etc")],
}

WORKDIR = "/proc/self/fd/7"        # CVE-2024-21626: runc's leaked fd 7 was the host's cgroupfs

# rootfs/dev -> this, relative to the rootfs <daemon dir>/state/tasks/<ns>/<id>/rootfs: five
# levels up is the daemon's own directory, where the test keeps a canary.
DEV_UP_AND_OUT = "../../../../../canary"
HOSTILE_DEV = {"dev-symlink-to-tmp": "/tmp", "dev-symlink-up-and-out": DEV_UP_AND_OUT}


@pytest.fixture(scope="session")
def hostile_images(tmp_path_factory) -> dict[str, str]:
    """name -> OCI layout, built once per session (and per worker)."""
    base = tmp_path_factory.mktemp("hostile-images")
    images = {name: build_on_busybox(str(base / name), members, user_tag=USER)
              for name, members in HOSTILE_PASSWD.items()}
    images["workdir-proc-self-fd"] = build_on_busybox(str(base / "workdir"), [],
                                                      ("--config.workingdir", WORKDIR))
    for name, target in HOSTILE_DEV.items():
        images[name] = build_on_busybox(str(base / name), [member("dev", tarfile.SYMTYPE, linkname=target)])
    return images


def pull(berth, registry, layout: str, name: str, tag: str = "latest") -> str:
    """Push the layout's `tag` to the test's registry as name:tag and pull it into the namespace."""
    registry.push(layout, f"{name}:{tag}", layout_tag=tag)
    return berth.client.pull(f"{registry.host}/{name}:{tag}", plain_http=True)["name"]


# --- 1. ids, names, a missing image, a second task ----------------------------------------------

BAD_IDS = ["../escape", "..", "a/../../escape", "/escape", "a..b", "", "x" * 77]


def test_container_and_exec_ids_with_dot_dot_or_over_76_chars_are_invalid_argument(berth):
    cid = unique()
    start_detached(berth, cid)
    task_root = os.path.dirname(berth.task_dir(cid))
    before = {d: sorted(os.listdir(d)) for d in (berth.daemon.dir, berth.state, task_root)}
    for bad in BAD_IDS:
        for service, method, args in [
                ("metadata", "create_container", {"id": bad, "runtime": {"name": "runc"},
                                                  "spec": spec_for(berth, cid)}),
                ("runtime", "create", {"container_id": bad}),
                ("runtime", "state", {"container_id": bad}),
                ("runtime", "kill", {"container_id": bad, "signal": 9}),
                ("runtime", "delete", {"container_id": bad}),
                ("runtime", "exec", {"container_id": cid, "exec_id": bad, "spec": {"args": ["true"]}})]:
            with pytest.raises(InvalidArgument):
                berth.client.call(service, method, args)
        if bad:                          # "" names the init where an exec id is optional
            for method in ("start", "kill", "delete", "wait", "close_io"):
                with pytest.raises(InvalidArgument):
                    berth.client.call("runtime", method, {"container_id": cid, "exec_id": bad, "signal": 9}
                                      if method == "kill" else {"container_id": cid, "exec_id": bad})
        other = berth.daemon.client(bad or "-")
        try:
            with pytest.raises(InvalidArgument):
                other.call("runtime", "create", {"container_id": cid})
        finally:
            other.close()
    # Nothing was made anywhere, by any of those names; the running task is as it was.
    assert {d: sorted(os.listdir(d)) for d in before} == before
    assert not [p for p, dirs, files in os.walk(berth.daemon.dir) if "escape" in dirs + files]
    assert berth.client.tasks.state(cid)["status"] == "running"
    assert berth.client.tasks.state(cid)["execs"] == {}
    still_serving(berth)


def test_namespace_and_id_too_long_for_the_shims_socket_are_invalid_argument(berth):
    prefix = len(os.path.join(berth.state, "tasks", berth.ns, "").encode())
    longest = MAX_SOCKET_PATH - prefix - len("/shim.sock")
    assert 0 < longest < 76                       # both ids below are valid identifiers
    fits, too_long = "k" * longest, "k" * (longest + 1)
    for cid in (fits, too_long):
        berth.client.containers.new(cid, berth.image, args=["echo", "ran"])
    with pytest.raises(InvalidArgument, match="socket"):
        berth.client.containers.load(too_long).new_task()
    assert not os.path.lexists(berth.task_dir(too_long))
    assert too_long not in berth.runtime_ids()
    with pytest.raises(NotFound):
        berth.client.tasks.state(too_long)
    # One byte shorter is a socket path the shim can bind: that task runs.
    assert berth.cli("tasks", "start", fits).stdout == "ran\n"
    for cid in (fits, too_long):
        berth.client.containers.load(cid).delete()
    assert mounts_mentioning(berth.daemon.dir) == []
    still_serving(berth)


def test_a_missing_image_is_not_found(berth, registry):
    cid = unique()
    with pytest.raises(NotFound):
        berth.client.containers.new(cid, f"{registry.host}/no-such-image:1")
    refused_clearly(berth.cli("run", "--rm", f"{registry.host}/no-such-image:1", cid, "true", check=False),
                    "not found")
    assert_nothing_left(berth, cid)
    # A container whose image was never unpacked (its snapshot is missing): no task, nothing mounted.
    berth.client.containers.create(cid, runtime="runc", spec=spec_for(berth, cid),
                                   snapshotter="overlayfs", snapshot_key=cid)
    with pytest.raises(NotFound):
        berth.client.containers.load(cid).new_task()
    assert not os.path.lexists(berth.task_dir(cid))
    berth.client.containers.delete(cid)
    assert_nothing_left(berth, cid)
    still_serving(berth)


def test_a_second_task_for_one_container_is_already_exists(berth):
    cid = unique()
    start_detached(berth, cid)
    first = berth.client.tasks.state(cid)
    with pytest.raises(AlreadyExists, match="already has a task"):
        berth.client.containers.load(cid).new_task()
    # Racing creates for one container: exactly one wins, the others are AlreadyExists.
    racer = unique()
    berth.client.containers.new(racer, berth.image, args=["sleep", "1000"])
    outcomes: list = []

    def create() -> None:
        client = berth.daemon.client(berth.ns, timeout=60)
        try:
            client.containers.load(racer).new_task()
            outcomes.append("created")
        except BerthError as e:
            outcomes.append(e)
        finally:
            client.close()
    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes.count("created") == 1, outcomes
    assert all(isinstance(o, AlreadyExists) for o in outcomes if o != "created"), outcomes
    # Each container has one task, one shim; the first task did not notice any of it.
    for c in (cid, racer):
        title = f"berth-shim: {berth.ns}/{c}"
        assert [int(p) for p in os.listdir("/proc") if p.isdigit() and proc_title(int(p)) == title] \
            == [shim_pid(berth, c)]
    again = berth.client.tasks.state(cid)
    assert (again["pid"], again["shim_pid"], again["status"]) == (first["pid"], first["shim_pid"], "running")
    still_serving(berth)


# --- 2. a flood of failing execs ----------------------------------------------------------------

def exec_missing_binary(task, exec_id: str) -> None:
    """`tasks exec` of a binary that is not there, as the CLI does it (FIFOs for stdio, then the
    delete of what did not start): the start is refused with the runtime's reason."""
    stdio = Stdio(stdin=True, stdout=True, stderr=True)
    try:
        proc = task.exec(exec_id, ["/no/such/binary"], stdio=stdio)
        with pytest.raises(FailedPrecondition, match="/no/such/binary.*no such file or directory"):
            proc.start()
        proc.delete()
    finally:
        stdio.close()


@pytest.mark.timeout(600)
def test_200_execs_of_a_missing_binary_leak_no_descriptors_or_memory(berth):
    cid = unique()
    start_detached(berth, cid)
    task = berth.client.tasks.get(cid)
    watched = {"shim": shim_pid(berth, cid), "runtime actor": runtime_actor_pid(berth)}
    for i in range(10):                                   # warm-up: pools, caches, lazy imports
        exec_missing_binary(task, f"warm{i}")

    def fds() -> dict[str, int]:
        return {name: fd_count(pid) for name, pid in watched.items()}
    baseline_fds = fds()
    baseline_rss = {name: rss_kib(pid) for name, pid in watched.items()}
    for i in range(200):
        exec_missing_binary(task, f"missing{i}")
    wait_until(lambda: fds() == baseline_fds, 15, what=f"descriptors back to {baseline_fds}, at {fds()}")
    grown = {name: rss_kib(pid) - baseline_rss[name] for name, pid in watched.items()}
    assert all(kib <= 8 * MiB for kib in grown.values()), f"RSS grew by {grown} KiB"
    assert berth.client.tasks.state(cid)["execs"] == {}
    assert berth.cli("tasks", "exec", cid, "echo", "fine").stdout == "fine\n"
    still_serving(berth)


# --- 3. /etc/passwd that is no file, or endless -------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", sorted(HOSTILE_PASSWD))
@pytest.mark.parametrize("how", ["image-user", "run-user"])
def test_user_lookup_in_a_hostile_passwd_is_refused_promptly(berth, registry, hostile_images, variant, how):
    tag = "user" if how == "image-user" else "latest"
    image = pull(berth, registry, hostile_images[variant], variant, tag)
    opts = [] if how == "image-user" else [oci.with_user(USER)]
    flags = [] if how == "image-user" else ["--user", USER]
    what = r"/etc/(passwd|group)" if variant.startswith("etc-") else "/etc/passwd"
    cid = unique()
    began = time.monotonic()
    with pytest.raises(InvalidArgument, match=what):
        berth.client.containers.new(cid, image, spec_opts=opts, args=["id"])
    refused_clearly(berth.cli("run", "--rm", *flags, image, cid, "id", check=False, timeout=60), "/etc/")
    assert time.monotonic() - began < 30                  # no hang, no endless read
    assert_nothing_left(berth, cid)
    still_serving(berth)


# --- 4. WORKDIR /proc/self/fd/7 -----------------------------------------------------------------

def assert_cwd_inside(output: str) -> None:
    """What `pwd` printed from a process that did start: a path in the container's tree, not
    the kernel's "(unreachable)" prefix of a directory outside its root."""
    cwd = output.strip()
    assert cwd.startswith("/") and "unreachable" not in cwd, cwd


@pytest.mark.timeout(180)
@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_workdir_through_proc_self_fd_gets_no_cwd_outside_the_rootfs(berth, registry, hostile_images,
                                                                       runtime, tmp_path):
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    image = pull(berth, registry, hostile_images["workdir-proc-self-fd"], "workdir")
    cid = unique()
    container = berth.client.containers.new(cid, image, runtime=runtime, args=["pwd"])
    assert container.spec["process"]["cwd"] == WORKDIR
    out = tmp_path / "out"
    out.touch()
    try:
        task = container.new_task(stdout=str(out))
    except (FailedPrecondition, InvalidArgument) as e:
        assert WORKDIR in str(e), e                       # the runtime's refusal, said clearly
        assert not os.path.lexists(berth.task_dir(cid))
    else:
        task.start()
        assert task.wait(timeout=30) == 0
        task.delete()
        assert_cwd_inside(out.read_text())
    container.delete()
    refused = berth.cli("run", "--rm", "--runtime", runtime, image, unique(), "pwd", check=False)
    if refused.returncode:
        refused_clearly(refused, WORKDIR)
    else:
        assert_cwd_inside(refused.stdout)

    # The same cwd for an exec into a running container (runc's exec path of the CVE).
    running = unique()
    berth.cli("run", "-d", "--runtime", runtime, berth.image, running, "sleep", "1000")
    out.write_text("")
    proc = berth.client.tasks.get(running).exec("cwd", ["pwd"], cwd=WORKDIR, stdout=str(out))
    try:
        proc.start()
    except (FailedPrecondition, InvalidArgument) as e:
        assert WORKDIR in str(e), e
    else:
        assert proc.wait(timeout=30) == 0
        assert_cwd_inside(out.read_text())
    proc.delete()
    assert berth.client.tasks.state(running)["status"] == "running"
    still_serving(berth)


# --- 5. /dev as a symlink out of the root -------------------------------------------------------

def host_dir_state(path: str) -> dict:
    """A directory's names, and what each is (type, size, mtime, link target): to see it unchanged."""
    state = {}
    for name in sorted(os.listdir(path)):
        st = os.lstat(os.path.join(path, name))
        target = os.readlink(os.path.join(path, name)) if os.path.islink(os.path.join(path, name)) else None
        state[name] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return state


@pytest.mark.timeout(180)
@pytest.mark.parametrize("runtime", ["runc", "crun"])
@pytest.mark.parametrize("variant", sorted(HOSTILE_DEV))
def test_dev_symlinked_out_of_the_root_touches_nothing_outside(berth, registry, hostile_images, variant,
                                                               runtime):
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    image = pull(berth, registry, hostile_images[variant], variant)
    canary = os.path.join(berth.daemon.dir, "canary")
    os.mkdir(canary)
    with open(os.path.join(canary, "untouched"), "w") as f:
        f.write("untouched\n")
    cid = unique()
    # The relative link does reach the canary from where the rootfs is mounted.
    assert os.path.normpath(os.path.join(berth.task_dir(cid), "rootfs", DEV_UP_AND_OUT)) == canary
    before_tmp = {n for n in RUNC_DEV_LINKS if os.path.lexists(os.path.join("/tmp", n))}
    before_canary = host_dir_state(canary)

    container = berth.client.containers.new(cid, image, runtime=runtime, args=["echo", "ran"])
    with pytest.raises(FailedPrecondition, match="/dev"):
        container.new_task()
    assert not os.path.lexists(berth.task_dir(cid))
    container.delete()
    refused = berth.cli("run", "--rm", "--runtime", runtime, image, unique(), "echo", "ran", check=False)
    refused_clearly(refused, "/dev")

    assert host_dir_state(canary) == before_canary
    assert {n for n in RUNC_DEV_LINKS if os.path.lexists(os.path.join("/tmp", n))} == before_tmp
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    over_host = {"/tmp", canary, *(os.path.join(d, n) for d in ("/tmp", canary)
                                   for n in ("pts", "shm", "mqueue"))}
    assert not points & over_host, points & over_host
    assert mounts_mentioning(berth.daemon.dir) == []
    still_serving(berth)


def test_a_shims_socket_holds_to_the_routers_limits(berth):
    """The shim's own socket takes berthd's requests without the router in between: a message
    of too many frames, or with a frame over the size limit, is refused there as the router
    refuses it, and the shim serves on."""
    import zmq

    from bus import codec
    from bus.envelope import Reply, Request
    cid = unique()
    berth.cli("run", "-d", berth.image, cid, "sleep", "1000")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{berth.task_dir(cid)}/shim.sock")
    try:
        def ask(*bulk: bytes) -> Reply:
            header = Request(1, "shim", "state", None, None, time.time() + 30, {}).encode()
            sock.send_multipart([header, *bulk])
            assert sock.poll(30_000), "the shim did not answer"
            return Reply.decode(sock.recv_multipart()[0])
        for bulk in ([b"x"] * codec.MAX_FRAMES, [b"x" * (codec.MAX_BULK_FRAME + 1)]):
            reply = ask(*bulk)
            assert not reply.ok and reply.error["code"] == "ResourceExhausted"
        assert ask().unwrap()["status"] == "running"
    finally:
        sock.close()
