"""`berth run [--rm] [-d] [-t] ... IMAGE ID [ARGS...]`: a container from an image, its task, its exit.

As ctr's `run`: the container record and its snapshot are made from the image, the task is
created with FIFOs this command makes in a private directory (containerd's cio), our stdin,
stdout and stderr are copied through them, and the command exits with the container's status.
With `-t` the container gets a terminal: ours goes raw, and its size follows ours (SIGWINCH).
Without `-t`, the signals this command gets (Ctrl-C among them) are passed on to the task.
`-d` returns once the task has started, and prints nothing. `--rm` deletes the container and
its snapshot after the exit.

Module imports are kept to the standard library: everything else is imported in the handler,
so `berth --help` and the other commands do not pay for it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def register(sub) -> None:
    p = sub.add_parser("run", help="run a container from an image")
    add_container_options(p)
    p.add_argument("--rm", action="store_true", help="delete the container and its snapshot after it exits")
    p.add_argument("-d", "--detach", action="store_true", help="return once the task has started")
    p.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("id", metavar="ID")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command (default: the image's)")
    p.set_defaults(func=run)


def add_container_options(p) -> None:
    """The options that shape a container, shared with `containers create`."""
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable")
    p.add_argument("--mount", action="append", default=[], metavar="SPEC",
                   help="add a mount, e.g. type=bind,src=/host,dst=/in,options=rbind:ro")
    p.add_argument("--net-host", action="store_true", help="share the host's network namespace")
    p.add_argument("--snapshotter", default=os.environ.get("BERTH_SNAPSHOTTER", "overlayfs"),
                   help="snapshotter for the root filesystem (env BERTH_SNAPSHOTTER; default %(default)s)")
    p.add_argument("--runtime", default="runc", help="runc, crun, or io.containerd.runc.v2 (default %(default)s)")
    p.add_argument("--memory-limit", type=int, metavar="BYTES", help="memory limit")
    p.add_argument("--cpus", type=float, metavar="N", help="CPU quota, in CPUs")
    p.add_argument("--cwd", metavar="DIR", help="working directory inside the container")
    p.add_argument("-u", "--user", metavar="USER", help="user[:group], by name or id")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--hostname", help="the container's hostname (default: its id)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the container")


def spec_options(args, tty: bool = False) -> list:
    from berth import oci
    opts = []
    if args.env:
        opts.append(oci.with_env(args.env))
    if args.mount:
        opts.append(oci.with_mounts([oci.parse_mount(m) for m in args.mount]))
    if args.net_host:
        opts.append(oci.with_host_namespace("network"))
    if args.memory_limit is not None:
        opts.append(oci.with_memory_limit(args.memory_limit))
    if args.cpus is not None:
        opts.append(oci.with_cpus(args.cpus))
    if args.cwd:
        opts.append(oci.with_cwd(args.cwd))
    if args.user:
        opts.append(oci.with_user(args.user))
    if args.read_only:
        opts.append(oci.with_readonly_rootfs())
    if args.hostname:
        opts.append(oci.with_hostname(args.hostname))
    if tty:
        opts.append(oci.with_tty())
    return opts


def run(client, args) -> int:
    from berth.cli.output import parse_labels
    from bus.errors import BerthError, InvalidArgument
    if args.rm and args.detach:
        raise InvalidArgument("--rm and --detach cannot be used together")
    container = client.containers.new(args.id, args.image, spec_opts=spec_options(args, args.tty),
                                      snapshotter=args.snapshotter, runtime=args.runtime,
                                      labels=parse_labels(args.label), args=args.args or None)
    finished = False
    try:
        if args.detach:
            start_detached(container.new_task())
            return 0
        status = run_attached(container.new_task, tty=args.tty)
        finished = True
        return status
    finally:
        if args.rm:
            # Once run_attached has deleted the task, there is no need to ask whether one is left.
            with contextlib.suppress(BerthError) if not finished else contextlib.nullcontext():
                container.delete(snapshot=True, check_task=not finished)


def stdin_wanted() -> bool:
    """Whether our stdin is worth a FIFO: not when it is /dev/null or closed."""
    try:
        st = os.fstat(0)
    except OSError:
        return False
    return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3))


def run_attached(make, tty: bool = False) -> int:
    """Make a process with FIFOs (`make(stdio)`: a new task, or an exec), copy our stdio through
    them, start it, wait, delete it; its exit status."""
    from berth.client import Stdio
    stdio = Stdio(stdin=tty or stdin_wanted(), stdout=True, stderr=not tty, terminal=tty)
    try:
        proc = make(stdio)
    except BaseException:
        stdio.close()
        raise
    deleted = False
    try:
        with terminal(tty) as term, Relay(proc, tty) as relay:
            stdio.attach(0 if stdio.stdin else None, 1, None if tty else 2, on_stdin_eof=_quietly(proc.close_io))
            if term and not proc.exec_id:
                relay.resize()       # the init's terminal exists once it is created: size it before it runs
            proc.start()
            if term and proc.exec_id:
                relay.resize()       # an exec's terminal is made when it starts
            status = proc.wait()
            proc.delete()            # and the output is copied to its end (see Task.delete)
            deleted = True
        return exit_code(status)
    finally:
        if not deleted:
            discard(proc)
        stdio.close()


def start_detached(proc) -> None:
    """Start a created process and leave it running; one that fails to start is not left behind."""
    try:
        proc.start()
    except BaseException:
        discard(proc)
        raise


def discard(proc) -> None:
    """Delete a process that did not run to its end here (a failed start, an error on the way),
    killing it first if it must."""
    from bus.errors import BerthError, NotFound
    try:
        proc.delete()
        return
    except NotFound:
        return
    except BerthError:
        pass                                     # still running: kill it, then delete it
    with contextlib.suppress(BerthError):
        proc.kill(signal.SIGKILL, all=not proc.exec_id)
    with contextlib.suppress(BerthError):
        proc.wait(timeout=30)
    with contextlib.suppress(NotFound):
        proc.delete()


def _quietly(fn):
    def call():
        from bus.errors import BerthError
        with contextlib.suppress(BerthError):
            fn()
    return call


@contextlib.contextmanager
def terminal(wanted: bool):
    """Our terminal in raw mode while the container has it (restored after), if we have one."""
    if not wanted or not os.isatty(0):
        yield False
        return
    import termios
    import tty
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield True
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


class Relay:
    """Signals to this command, handled on a thread of their own: SIGWINCH resizes the process's
    terminal; with no terminal, the others are sent on to the process (ctr's signal proxy).
    The C-level handler writes each signal's number to a pipe (signal.set_wakeup_fd)."""

    def __init__(self, proc, tty: bool):
        self.proc = proc
        self.tty = tty
        self.signals = (signal.SIGWINCH,) if tty else (*FORWARDED, signal.SIGWINCH)
        self.thread = None

    def __enter__(self) -> "Relay":
        import threading
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.previous = {s: signal.signal(s, lambda *_: None) for s in self.signals}
        self.old_wakeup = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._run, name="signals", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self.old_wakeup)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        os.write(self.write, b"\0")             # ends the thread
        self.thread.join(5)
        os.close(self.read)
        os.close(self.write)

    def resize(self) -> None:
        from bus.errors import BerthError
        try:
            size = os.get_terminal_size(0)
        except OSError:
            return
        with contextlib.suppress(BerthError):
            self.proc.resize(size.columns, size.lines)

    def _run(self) -> None:
        import select
        from bus.errors import BerthError
        while True:
            select.select([self.read], [], [])
            try:
                data = os.read(self.read, 64)
            except BlockingIOError:
                continue
            for signum in data:
                if signum == 0:
                    return
                if signum == signal.SIGWINCH:
                    if self.tty:
                        self.resize()
                    continue
                with contextlib.suppress(BerthError):
                    self.proc.kill(signum)


def exit_code(status: int | None) -> int:
    return 255 if status is None else max(0, min(int(status), 255))
