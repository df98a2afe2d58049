"""The OCI runtime (runc or crun) driven through its command line, as containerd's go-runc does.

Every command runs with `--root <state>/<runtime>/<namespace>` (the shim is told which) and
`--log <task dir>/runtime.log --log-format json`, so a failure's reason can be read back from the
log even when the command's own stderr is the container's. Commands are started through the
shim's Reaper (it reaps every child, see shimd.reaper) and waited for through it.

crun on hybrid cgroup hosts: crun 1.8 refuses to run when cgroup v2 is mounted beside the v1
controllers ("cgroups in hybrid mode not supported"), but works in legacy v1 mode when it cannot
see the v2 mount. So on such a host (a cgroup2 mount at /sys/fs/cgroup/unified, with v1 controllers
under /sys/fs/cgroup) every crun command is run through
`unshare --mount --propagation slave -- sh -c 'umount /sys/fs/cgroup/unified && exec "$@"'`:
each command gets a private copy of the mount table, without that one mount, and then becomes
crun. Nothing changes for the host or for the shim's own view, the container is created in v1
cgroups exactly as runc would create it, and callers never see the difference. A wrapper command
rather than a preexec_fn: the shim has threads, and Python code between fork and exec in a
threaded process can deadlock.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from bus.errors import FailedPrecondition, InvalidArgument, NotFound
from shimd.reaper import Reaper

log = logging.getLogger("berth.shim.runtime")

UNIFIED = "/sys/fs/cgroup/unified"
HIDE_UNIFIED = f'umount {UNIFIED} && exec "$@"'
DEFAULT_TIMEOUT = 60.0


class RuntimeCommandError(FailedPrecondition):
    """The OCI runtime refused or failed a command; the message carries its reason."""


def hybrid_cgroups() -> bool:
    """cgroup v1 controllers with a cgroup v2 hierarchy mounted beside them."""
    return os.path.ismount(UNIFIED) and not os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def command(binary: str, root: str, *args: str, log_path: str = "") -> list[str]:
    """The command line of one runtime command, wrapped for crun on a hybrid host (see above).
    For whoever runs the runtime outside a shim, e.g. berthd cleaning up after a dead shim:
    `subprocess.run(command("crun", root, "delete", "--force", id))`."""
    path = shutil.which(binary) or binary
    argv = [path, "--root", root]
    if log_path:
        argv += ["--log", log_path, "--log-format", "json"]
    argv += args
    if os.path.basename(path) == "crun" and hybrid_cgroups():
        argv = [shutil.which("unshare") or "unshare", "--mount", "--propagation", "slave", "--",
                shutil.which("sh") or "/bin/sh", "-c", HIDE_UNIFIED, "crun", *argv]
    return argv


class Runtime:
    def __init__(self, binary: str, root: str, reaper: Reaper, log_path: str,
                 timeout: float = DEFAULT_TIMEOUT):
        path = shutil.which(binary)
        if path is None:
            raise InvalidArgument(f"OCI runtime {binary!r} not found")
        self.binary = path
        self.name = os.path.basename(path)
        self.root = root
        self.reaper = reaper
        self.log_path = log_path
        self.timeout = timeout
        os.makedirs(root, mode=0o711, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return command(self.binary, self.root, *args, log_path=self.log_path)

    # --- the commands --------------------------------------------------------------------

    def create(self, id: str, bundle: str, pid_file: str, stdio: tuple[int, int, int],
               console_socket: str = "") -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self.run(*args, id, stdio=stdio)

    def start(self, id: str) -> None:
        self.run("start", id)

    def kill(self, id: str, signal: int, all: bool = False) -> None:
        self.run("kill", *(["--all"] if all else []), id, str(signal))

    def delete(self, id: str, force: bool = False) -> None:
        self.run("delete", *(["--force"] if force else []), id)

    def pause(self, id: str) -> None:
        self.run("pause", id)

    def resume(self, id: str) -> None:
        self.run("resume", id)

    def ps(self, id: str) -> list[int]:
        return json.loads(self.run("ps", "--format", "json", id) or b"[]") or []

    def state(self, id: str) -> dict:
        return json.loads(self.run("state", id))

    def list(self) -> list[dict]:
        return json.loads(self.run("list", "--format", "json") or b"[]") or []

    def update(self, id: str, resources: dict, scratch_dir: str) -> None:
        with tempfile.NamedTemporaryFile("w", dir=scratch_dir, prefix=".resources-", suffix=".json") as f:
            json.dump(resources, f)
            f.flush()
            self.run("update", "--resources", f.name, id)

    def exec(self, id: str, process_file: str, pid_file: str, stdio: tuple[int, int, int],
             console_socket: str = "") -> None:
        args = ["exec", "--detach", "--pid-file", pid_file, "--process", process_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self.run(*args, id, stdio=stdio)

    def checkpoint(self, id: str, image_path: str, work_path: str, leave_running: bool) -> None:
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path]
        if leave_running:
            args.append("--leave-running")
        self.run(*args, id, timeout=300.0)

    def restore(self, id: str, bundle: str, image_path: str, work_path: str, pid_file: str,
                stdio: tuple[int, int, int], console_socket: str = "") -> None:
        args = ["restore", "--detach", "--no-subreaper", "--bundle", bundle, "--image-path", image_path,
                "--work-path", work_path, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self.run(*args, id, stdio=stdio, timeout=300.0)

    # --- running one ---------------------------------------------------------------------

    def run(self, *args: str, stdio: tuple[int, int, int] | None = None,
            timeout: float | None = None) -> bytes:
        """Run one command; its stdout, or RuntimeCommandError (NotFound for a missing container)."""
        try:
            log_offset = os.path.getsize(self.log_path)
        except FileNotFoundError:
            log_offset = 0
        out = err = -1
        try:
            if stdio is None:
                out, err = _scratch(), _scratch()
                stdio = (_devnull(), out, err)
            status = self.reaper.spawn(self.argv(*args), *stdio).wait(timeout or self.timeout)
            if status == 0:
                return _read_all(out) if out >= 0 else b""
            reason = (self._reason(log_offset) or (_read_all(err).decode(errors="replace").strip() if err >= 0 else "")
                      or f"exit status {status}")
        finally:
            for fd in (out, err):
                if fd >= 0:
                    os.close(fd)
        log.debug("%s %s failed: %s", self.name, args[0], reason)
        if _missing(reason, self.root):
            raise NotFound(f"{self.name} {args[0]}: {reason}")
        raise RuntimeCommandError(f"{self.name} {args[0]} failed: {reason}")

    def _reason(self, offset: int) -> str:
        """The last error the runtime logged since `offset`."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                lines = f.read(1 << 20).splitlines()
        except FileNotFoundError:
            return ""
        reason = ""
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal") and entry.get("msg"):
                reason = str(entry["msg"])
        return reason


def _missing(reason: str, root: str) -> bool:
    """runc: "container does not exist"; crun: its state directory under the root cannot be opened."""
    return "does not exist" in reason or ("No such file or directory" in reason and root in reason)


def _scratch() -> int:
    """An unnamed file for a command's output (O_TMPFILE: one system call, nothing to remove)."""
    try:
        return os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:                     # a file system without O_TMPFILE
        fd, path = tempfile.mkstemp()
        os.unlink(path)
        return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


_DEVNULL: int | None = None


def _devnull() -> int:
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _DEVNULL
