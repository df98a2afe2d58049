"""`berth tasks start|ls|kill|ps|exec|pause|resume|rm|metrics|wait|attach|checkpoint`, as ctr's.

A task is a container's running instance; `berth run` makes one, `tasks start` makes one for a
container made by `containers create`. `tasks wait` and `tasks exec` exit with the process's
status, as `run` does.
"""
from __future__ import annotations

import argparse
import contextlib
import signal as signals
import sys

from berth.cli.output import add_format, as_json, table


def register(sub) -> None:
    p = sub.add_parser("tasks", aliases=["task", "t"], help="manage tasks")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    st = cmds.add_parser("start", help="start the task of a container, attached to this terminal")
    st.add_argument("-d", "--detach", action="store_true", help="return once it has started")
    st.add_argument("-t", "--tty", action="store_true", help="the container's spec has a terminal")
    st.add_argument("--checkpoint", default="", metavar="IMAGE",
                    help="restore the task from a checkpoint image (tasks checkpoint)")
    st.add_argument("id", metavar="CONTAINER")
    st.set_defaults(func=start)

    ls = cmds.add_parser("ls", aliases=["list"], help="list tasks")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the container ids")
    add_format(ls)
    ls.set_defaults(func=list_)

    k = cmds.add_parser("kill", help="signal a task (or one of its execs)")
    k.add_argument("-s", "--signal", default="SIGTERM", help="signal name or number (default SIGTERM)")
    k.add_argument("-a", "--all", action="store_true", help="every process of the task")
    k.add_argument("--exec-id", default="", help="signal this exec instead of the init")
    k.add_argument("id", metavar="CONTAINER")
    k.set_defaults(func=kill)

    ps = cmds.add_parser("ps", help="the task's processes")
    add_format(ps)
    ps.add_argument("id", metavar="CONTAINER")
    ps.set_defaults(func=ps_)

    ex = cmds.add_parser("exec", help="run a process in a running task; exits with its status")
    ex.add_argument("--exec-id", default="", help="the process's id (default: a random one)")
    ex.add_argument("-t", "--tty", action="store_true", help="give the process a terminal")
    ex.add_argument("-d", "--detach", action="store_true", help="return once it has started")
    ex.add_argument("--cwd", metavar="DIR", help="working directory (default: the container's)")
    ex.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment (replaces)")
    ex.add_argument("-u", "--user", metavar="UID[:GID]", help="numeric user (default: the container's)")
    ex.add_argument("id", metavar="CONTAINER")
    ex.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    ex.set_defaults(func=exec_)

    for name, func, help in (("pause", pause, "freeze a task"), ("resume", resume, "thaw a task")):
        c = cmds.add_parser(name, help=help)
        c.add_argument("id", metavar="CONTAINER")
        c.set_defaults(func=func)

    rm = cmds.add_parser("rm", aliases=["delete", "del", "remove"], help="delete stopped tasks")
    rm.add_argument("-f", "--force", action="store_true", help="kill a running task first")
    rm.add_argument("--exec-id", default="", help="delete this exec instead of the task")
    rm.add_argument("ids", nargs="+", metavar="CONTAINER")
    rm.set_defaults(func=remove)

    m = cmds.add_parser("metrics", aliases=["metric"], help="a task's cgroup figures")
    add_format(m)
    m.add_argument("id", metavar="CONTAINER")
    m.set_defaults(func=metrics)

    w = cmds.add_parser("wait", help="wait for a task (or exec) to exit; exits with its status")
    w.add_argument("--exec-id", default="", help="wait for this exec instead of the init")
    w.add_argument("id", metavar="CONTAINER")
    w.set_defaults(func=wait)

    a = cmds.add_parser("attach", help="copy a running task's stdio FIFOs to this terminal until it exits")
    a.add_argument("id", metavar="CONTAINER")
    a.set_defaults(func=attach)

    cp = cmds.add_parser("checkpoint", help="checkpoint a task (CRIU) into an image in the content store; "
                                             "prints the image's name")
    cp.add_argument("--exit", action="store_true", help="stop the task once it is checkpointed")
    cp.add_argument("--image", metavar="NAME", help="the image's name (default checkpoint/<id>:<unix time>)")
    cp.add_argument("id", metavar="CONTAINER")
    cp.set_defaults(func=checkpoint)


def parse_signal(text: str) -> int:
    from bus.errors import InvalidArgument
    if text.isdigit():
        return int(text)
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise InvalidArgument(f"unknown signal {text!r}") from None


def start(client, args) -> int:
    from berth.cli.run import run_attached, start_detached
    container = client.containers.load(args.id)
    if args.detach:
        start_detached(container.new_task(checkpoint=args.checkpoint))
        return 0
    tty = args.tty or bool(container.spec.get("process", {}).get("terminal"))
    return run_attached(lambda stdio: container.new_task(stdio, checkpoint=args.checkpoint), tty=tty)


def list_(client, args) -> int:
    tasks = client.tasks.list()
    if args.quiet:
        for t in tasks:
            print(t["container_id"])
    elif args.format == "json":
        as_json(tasks)
    else:
        table(["TASK", "PID", "STATUS"], [[t["container_id"], t["pid"], str(t["status"]).upper()] for t in tasks])
    return 0


def kill(client, args) -> int:
    from berth.client import Process, Task
    sig = parse_signal(args.signal)
    proc = Process(client, args.id, args.exec_id) if args.exec_id else Task(client, args.id)
    proc.kill(sig, all=args.all)
    return 0


def ps_(client, args) -> int:
    from berth.client import Task
    pids = Task(client, args.id).pids()
    if args.format == "json":
        as_json(pids)
    else:
        table(["PID", "EXEC"], [[p["pid"], p.get("exec_id") or "-"] for p in pids])
    return 0


def exec_(client, args) -> int:
    import secrets

    from berth.cli.run import run_attached
    from berth.client import Task
    from bus.errors import InvalidArgument
    if not args.args:
        raise InvalidArgument("tasks exec: give the command to run")
    exec_id = args.exec_id or f"exec-{secrets.token_hex(6)}"
    user = None
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise InvalidArgument(f"--user {args.user!r}: give a numeric uid[:gid]")
        user = {"uid": int(uid), "gid": int(gid or 0)}
    task = Task(client, args.id)
    env = None
    if args.env:                     # added to the container's environment, as ctr's
        from berth.oci import _merge_env
        base = client.containers.get(args.id).get("spec", {}).get("process", {}).get("env") or []
        env = _merge_env(base, args.env)
    options = {"env": env, "cwd": args.cwd, "user": user}

    def make(stdio=None):
        return task.exec(exec_id, args.args, stdio=stdio, terminal=args.tty, **options)
    if args.detach:
        proc = make()
        try:
            proc.start()
        except BaseException:
            from berth.cli.run import discard
            discard(proc)
            raise
        return 0
    return run_attached(make, tty=args.tty)


def pause(client, args) -> int:
    from berth.client import Task
    Task(client, args.id).pause()
    return 0


def resume(client, args) -> int:
    from berth.client import Task
    Task(client, args.id).resume()
    return 0


def remove(client, args) -> int:
    from berth.client import Process, Task
    from bus.errors import BerthError, NotFound
    failed = 0
    for cid in args.ids:
        proc = Process(client, cid, args.exec_id) if args.exec_id else Task(client, cid)
        try:
            if args.force:
                with contextlib.suppress(NotFound):
                    proc.kill(signals.SIGKILL, all=not args.exec_id)
                proc.wait(timeout=60)
            proc.delete()
        except BerthError as e:
            print(f"berth: unable to delete task {cid}: {e}", file=sys.stderr)
            failed = 1
    return failed


def metrics(client, args) -> int:
    from berth.client import Task
    figures = Task(client, args.id).metrics()
    if args.format == "json":
        as_json(figures)
        return 0
    rows = []
    for group in ("memory", "pids", "cpu"):
        for key, value in sorted((figures.get(group) or {}).items()):
            rows.append([f"{group}.{key}", "-" if value is None else value])
    table(["METRIC", "VALUE"], rows)
    return 0


def wait(client, args) -> int:
    from berth.client import Process, Task
    from berth.cli.run import exit_code
    proc = Process(client, args.id, args.exec_id) if args.exec_id else Task(client, args.id)
    return exit_code(proc.wait())


def attach(client, args) -> int:
    import os

    from berth.cli.run import Relay, exit_code, terminal
    from berth.client import Stdio, Task
    from bus.errors import FailedPrecondition
    task = Task(client, args.id)
    stdio_paths = task.state().get("stdio") or {}
    paths = {k: stdio_paths.get(k) or "" for k in ("stdin", "stdout", "stderr")}
    if not any(paths.values()) or not all(os.path.exists(p) for p in paths.values() if p):
        raise FailedPrecondition(f"task {args.id} has no stdio FIFOs to attach to (it was started detached, "
                                 "or whoever made its FIFOs is gone)")
    tty = bool(stdio_paths.get("terminal"))
    stdio = Stdio(stdin=False, stdout=False, stderr=False, terminal=tty)
    try:
        for name, path in paths.items():
            if path:
                flags = os.O_RDWR if name == "stdin" else os.O_RDONLY | os.O_NONBLOCK
                stdio.fds[name] = os.open(path, flags | os.O_CLOEXEC)
        with terminal(tty), Relay(task, tty) as relay:
            stdio.attach(0 if "stdin" in stdio.fds else None, 1, 2)
            if tty:
                relay.resize()
            status = task.wait()
            stdio.drain(1.0)
        return exit_code(status)
    finally:
        stdio.close()


def checkpoint(client, args) -> int:
    from berth.client import Task
    print(Task(client, args.id).checkpoint(image=args.image, exit=args.exit)["name"])
    return 0
