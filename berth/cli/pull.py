"""`berth pull` (ctr's alias of `images pull`), and what pull, push and `content fetch` share:
their registry flags and their progress display.

On a terminal the progress is one bar per blob (rich, loaded only then): its ingest ref, status,
bytes so far of its size, and speed. Otherwise it is plain lines, one each time a ref's status
changes (not one per chunk), as a log or a pipe wants them:

    127.0.0.1:5000/busybox:latest: resolving 0/0
    layer-sha256:9fa9e94b…: downloading 0/1088412
    layer-sha256:9fa9e94b…: done 1088412/1088412
    unpack-sha256:9fa9e94b…: unpacking 0/1088412
    unpack-sha256:9fa9e94b…: unpacked 1088412/1088412      ("unpacked (reused)": already a snapshot)
    image: 127.0.0.1:5000/busybox:latest digest: sha256:…
"""
from __future__ import annotations

import contextlib
import os
import sys


def register(sub) -> None:
    p = sub.add_parser("pull", help="pull an image from a registry (alias of `images pull`)")
    add_unpack_arguments(p)
    add_pull_arguments(p)
    p.set_defaults(func=pull)


def add_registry_arguments(parser) -> None:
    parser.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry, not HTTPS")
    parser.add_argument("-u", "--user", metavar="USER[:PASSWORD]",
                        help="registry credentials; without :PASSWORD it is asked for on the terminal")


def add_pull_arguments(parser) -> None:
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="pull the image for this platform (default: berthd's host)")
    add_registry_arguments(parser)
    parser.add_argument("ref", metavar="REF", help="e.g. docker.io/library/busybox:latest or repo@sha256:…")


def add_snapshotter_argument(parser) -> None:
    parser.add_argument("--snapshotter", metavar="NAME", default=os.environ.get("BERTH_SNAPSHOTTER") or None,
                        help="unpack into this snapshotter (env BERTH_SNAPSHOTTER; default: berthd's)")


def add_unpack_arguments(parser) -> None:
    """--snapshotter and --no-unpack, for `pull` and `images pull`."""
    add_snapshotter_argument(parser)
    parser.add_argument("--no-unpack", action="store_true",
                        help="fetch the content only; do not unpack the layers into snapshots")


def pull(client, args, unpack: bool | None = None) -> int:
    """Fetch REF's content and create or update its image record, then print its name and digest.
    `unpack=False` fetches only (`content fetch`); otherwise berthd unpacks as it does by default."""
    if getattr(args, "no_unpack", False):
        unpack = False
    snapshotter = getattr(args, "snapshotter", None) if unpack is not False else None
    if snapshotter:
        check_snapshotter(client, snapshotter)
    credentials = registry_credentials(args)
    with progress_display() as show:
        image = client.pull(args.ref, platform=args.platform, plain_http=args.plain_http,
                            credentials=credentials, progress=show, unpack=unpack, snapshotter=snapshotter)
    print(f"image: {image['name']} digest: {image['target']['digest']}", flush=True)
    return 0


def check_snapshotter(client, name: str) -> None:
    """NotFound, before anything is fetched, for a snapshotter berthd does not offer."""
    offered = sorted(s["name"] for s in client.snapshots.available())
    if name not in offered:
        from bus.errors import NotFound
        raise NotFound(f"snapshotter {name!r} is not available (offered: {', '.join(offered)})")


def registry_credentials(args) -> str | None:
    """--user as "user:password", asking for the password on the terminal when it is left out
    (as ctr does)."""
    user = getattr(args, "user", None)
    if not user or ":" in user:
        return user or None
    if not sys.stdin.isatty():
        from bus.errors import InvalidArgument
        raise InvalidArgument(f"--user {user}: give USER:PASSWORD (stdin is not a terminal to ask on)")
    import getpass
    return f"{user}:{getpass.getpass('Password: ')}"


@contextlib.contextmanager
def progress_display(out=None):
    """A progress callback for client.pull/push: bars on a terminal, plain lines otherwise."""
    out = out or sys.stdout
    if out.isatty():
        display = Bars(out)
    else:
        display = Lines(out)
    with display:
        yield display


class Lines:
    """`<ref>: <status> <offset>/<total>`, once per change of a ref's status."""

    def __init__(self, out):
        self.out = out
        self.status: dict[str, str] = {}

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.out.flush()

    def __call__(self, report: dict) -> None:
        ref, status = str(report.get("ref", "")), str(report.get("status", ""))
        if self.status.get(ref) == status:
            return
        self.status[ref] = status
        self.out.write(f"{_printable(ref)}: {_printable(status)} {report.get('offset', 0)}/{report.get('total', 0)}\n")
        self.out.flush()


class Bars:
    """One rich progress bar per ref: name, status, bar, bytes/total, speed."""

    FINISHED = ("done", "exists")

    def __init__(self, out):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TransferSpeedColumn)
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            TextColumn("{task.fields[status]:<11}", markup=False),
            BarColumn(bar_width=40),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=Console(file=out),
            refresh_per_second=10,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()            # draws the final state and joins the refresh thread

    def __call__(self, report: dict) -> None:
        ref, status = str(report.get("ref", "")), str(report.get("status", ""))
        offset, total = report.get("offset") or 0, report.get("total") or None
        finished = status in self.FINISHED or status.startswith("unpacked")
        if finished and total:
            offset = total
        task = self.tasks.get(ref)
        if task is None:
            task = self.tasks[ref] = self.progress.add_task(_short_ref(ref), total=total, status=status)
        self.progress.update(task, completed=offset, total=total, status=_printable(status))
        if finished:
            self.progress.stop_task(task)


def _short_ref(ref: str) -> str:
    """`layer-sha256:<12 hex>` for a blob's ingest ref; an image name as it is."""
    kind, sep, digest = ref.partition("-sha256:")
    if sep and len(digest) == 64:
        return f"{kind}-sha256:{digest[:12]}"
    return _printable(ref)


def _printable(text: str) -> str:
    """What a registry or archive named, made safe to print: no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text)
