"""A container process's stdio: what the runtime is handed, what the shim keeps, and the tty copy.

Without a terminal the container writes straight into the client's FIFOs (or a log file): the shim
opens each FIFO, hands the runtime the end the container needs, and keeps the other end itself
(as containerd's shim does) so that a client going away never turns into SIGPIPE or an early EOF
inside the container:

- stdin: the container gets the read end; the shim holds a write end until `close_stdin`
  (close_io), so the container sees EOF only once both the shim and the client have closed it.
- stdout / stderr: the container gets a write end; the shim holds a read end it never reads, so
  writes block when nobody reads instead of killing the writer. The client sees EOF when the
  container's processes have closed theirs.

No bytes pass through the shim, so it costs no CPU per byte. With a terminal the runtime sends the
pty master over a console socket (SCM_RIGHTS); then the shim copies stdin FIFO → master and master
→ stdout (FIFO or log file) on two threads it owns, joins them at close, and resizes the master.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import termios
import threading

from bus.errors import DeadlineExceeded, InvalidArgument

log = logging.getLogger("berth.shim.io")

CONSOLE_TIMEOUT = 30.0
CHUNK = 64 << 10


def _open(path: str, flags: int, what: str) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise InvalidArgument(f"cannot open {what} {path}: {e.strerror}") from None


def _is_fifo(fd: int) -> bool:
    return stat.S_ISFIFO(os.fstat(fd).st_mode)


class ProcessIO:
    """The stdio of one container process (the init or an exec)."""

    def __init__(self, name: str, stdin: str = "", stdout: str = "", stderr: str = "",
                 terminal: bool = False, log_path: str = ""):
        if log_path and (stdout or stderr):
            raise InvalidArgument("give either a log_path or stdout/stderr FIFOs, not both")
        for what, path in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr), ("log_path", log_path)):
            if path and not os.path.isabs(path):
                raise InvalidArgument(f"{what} must be an absolute path, not {path!r}")
        self.name = name
        self.terminal = terminal
        self.paths = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "log_path": log_path}
        self.owned: list[int] = []           # every fd this object opened and has not closed
        self.for_runtime: list[int] = []     # fds only the runtime needs: closed once it has them
        self.stdin_keeper: int | None = None
        self.master: int | None = None
        self.console: ConsoleSocket | None = None
        self.pumps: list[Pump] = []
        self.stdin_pump: Pump | None = None
        self.lock = threading.Lock()
        self.closed = False
        try:
            self._open(stdin, stdout, stderr, log_path)
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.owned.append(fd)
        return fd

    def _open(self, stdin: str, stdout: str, stderr: str, log_path: str) -> None:
        null = self._keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        self.stdin_fd = self.stdout_fd = self.stderr_fd = null
        if stdin:
            reader = self._keep(_open(stdin, os.O_RDONLY | os.O_NONBLOCK, "stdin"))
            if _is_fifo(reader):
                self.stdin_keeper = self._keep(_open(stdin, os.O_WRONLY | os.O_NONBLOCK, "stdin"))
            if not self.terminal:
                os.set_blocking(reader, True)
                self.for_runtime.append(reader)
            self.stdin_fd = reader
        if log_path:
            self.stdout_fd = self.stderr_fd = self._keep(
                _open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "log file"))
            if not self.terminal:
                self.for_runtime.append(self.stdout_fd)
        else:
            if stdout:
                self.stdout_fd = self._open_writer(stdout, "stdout")
            if stderr:
                self.stderr_fd = self.stdout_fd if stderr == stdout else self._open_writer(stderr, "stderr")
        if self.terminal:
            self.console = ConsoleSocket()

    def _open_writer(self, path: str, what: str) -> int:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise InvalidArgument(f"cannot open {what} {path}: {e.strerror}") from None
        if stat.S_ISFIFO(mode):
            self._keep(_open(path, os.O_RDONLY | os.O_NONBLOCK, what))      # never read: see above
            fd = self._keep(_open(path, os.O_WRONLY, what))
        else:
            fd = self._keep(_open(path, os.O_WRONLY | os.O_APPEND, what))
        if not self.terminal:
            self.for_runtime.append(fd)
        return fd

    # --- around the runtime command ------------------------------------------------------

    @property
    def runtime_stdio(self) -> tuple[int, int, int] | None:
        """What the runtime's create/exec gets as fds 0, 1, 2 (None with a terminal: the
        container's stdio is the pty, and the runtime's own output is captured)."""
        if self.terminal:
            return None
        return self.stdin_fd, self.stdout_fd, self.stderr_fd

    @property
    def console_path(self) -> str:
        return self.console.path if self.console else ""

    def started(self) -> None:
        """The runtime has created the process: drop what only it needed, start the tty copy."""
        with self.lock:
            for fd in self.for_runtime:
                self._close_fd(fd)
            self.for_runtime = []
        if self.console is None:
            return
        try:
            master = self.console.receive()
        finally:
            self.console.close()
            self.console = None
        os.set_blocking(master, False)
        self.master = self._keep(master)
        out = self.stdout_fd if (self.paths["stdout"] or self.paths["log_path"]) else None
        if out is not None:
            os.set_blocking(out, False)
        self._pump(f"{self.name}-stdout", master, out, eio_is_eof=True)   # with no stdout: drain it
        if self.paths["stdin"]:
            self.stdin_pump = self._pump(f"{self.name}-stdin", self.stdin_fd, master)

    def failed(self) -> None:
        """The runtime command failed: close everything."""
        self.close(timeout=0)

    # --- while it runs -------------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        if self.master is None:
            return
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        """The client has no more input: once it closes its end too, the process reads EOF."""
        with self.lock:
            if self.stdin_keeper is not None:
                self._close_fd(self.stdin_keeper)
                self.stdin_keeper = None

    def exited(self) -> None:
        """The process is gone: no more input for it (its output drains until EOF)."""
        self.close_stdin()
        if self.stdin_pump is not None:
            self.stdin_pump.stop()

    def close(self, timeout: float = 2.0) -> None:
        """Give the tty output up to `timeout` to drain, then stop the copy and close every fd."""
        if self.closed:
            return
        if self.stdin_pump is not None:
            self.stdin_pump.stop()
        for pump in self.pumps:
            pump.join(timeout)
            pump.stop()
        for pump in self.pumps:
            if not pump.join(1.0):
                log.warning("%s: copy thread %s did not stop", self.name, pump.name)
        with self.lock:
            self.closed = True
            if self.console is not None:
                self.console.close()
                self.console = None
            for fd in list(self.owned):
                self._close_fd(fd)

    def _close_fd(self, fd: int) -> None:
        if fd in self.owned:
            self.owned.remove(fd)
            os.close(fd)

    # --- the tty copy --------------------------------------------------------------------

    def _pump(self, name: str, src: int, dst: int | None, eio_is_eof: bool = False) -> "Pump":
        pump = Pump(name, src, dst, eio_is_eof)
        self.pumps.append(pump)
        pump.start()
        return pump


class Pump:
    """One copy thread, src → dst, until EOF (a pty master reports the last slave closing as
    EIO) or `stop`. Both fds are non-blocking; the thread waits in poll, never in read or write."""

    def __init__(self, name: str, src: int, dst: int | None, eio_is_eof: bool = False):
        self.name = name
        self.src, self.dst, self.eio_is_eof = src, dst, eio_is_eof
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.stop_w < 0:
            return                        # joined already
        try:
            os.write(self.stop_w, b"x")
        except OSError:
            pass

    def join(self, timeout: float | None) -> bool:
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        if self.stop_r >= 0:
            os.close(self.stop_r)
            os.close(self.stop_w)
            self.stop_r = self.stop_w = -1
        return True

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.src, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        dst = self.dst
        try:
            while True:
                if any(fd == self.stop_r for fd, _ in poller.poll()):
                    return
                try:
                    data = os.read(self.src, CHUNK)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno == errno.EIO and self.eio_is_eof:
                        return
                    raise
                if not data:
                    return
                if dst is not None and not self._write_all(dst, data):
                    dst = None            # the reader went away: keep draining, drop the bytes
        except Exception:
            log.exception("%s: copying stdio failed", self.name)

    def _write_all(self, fd: int, data: bytes) -> bool:
        view = memoryview(data)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.register(self.stop_r, select.POLLIN)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                if any(f == self.stop_r for f, _ in poller.poll()):
                    return False
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.EIO, errno.EBADF):
                    return False
                raise
            view = view[n:]
        return True


class ConsoleSocket:
    """Where the runtime sends a terminal's pty master (runc/crun `--console-socket`).

    A short path in a private temporary directory: socket paths are limited to 108 bytes, which
    a task directory under a long state root can exceed."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="berth-pty-")
        self.path = os.path.join(self.dir, "pty.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.listen(1)

    def receive(self, timeout: float = CONSOLE_TIMEOUT) -> int:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise DeadlineExceeded(f"the runtime sent no terminal within {timeout}s") from None
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise DeadlineExceeded("the runtime closed the console socket without sending a terminal")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
