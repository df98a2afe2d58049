"""`berth snapshots ls|tree|mounts|prepare|view|commit|rm|usage|diff|info|label`, as ctr has them.

`--snapshotter` (env BERTH_SNAPSHOTTER, default overlayfs) goes before or after the action.
Snapshots made here (prepare, view, commit) carry a `containerd.io/gc.root` label, as ctr's do,
so GC leaves them alone until they are removed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

from berth.labels import GC_ROOT
from berth.cli.content import human_size
from berth.cli.output import add_format, as_json, parse_labels, remove_each, table

DEFAULT_SNAPSHOTTER = "overlayfs"
KIND_TITLES = {"active": "Active", "view": "View", "committed": "Committed"}   # as ctr prints them


def register(sub) -> None:
    p = sub.add_parser("snapshots", aliases=["snapshot"], help="manage snapshots")
    p.add_argument("--snapshotter", default=os.environ.get("BERTH_SNAPSHOTTER", DEFAULT_SNAPSHOTTER),
                   help="snapshotter to use (env BERTH_SNAPSHOTTER; default %(default)s)")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str, func, aliases=()):
        c = cmds.add_parser(name, aliases=list(aliases), help=help)
        c.add_argument("--snapshotter", default=argparse.SUPPRESS, help="as before the action")
        c.set_defaults(func=func)
        return c

    ls = action("ls", "list snapshots", list_, aliases=["list"])
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the keys")
    add_format(ls)
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. kind==committed, 'labels.\"k\"==v'")

    action("tree", "show the snapshots as a tree of parents and children", tree)

    m = action("mounts", "print the mount commands for a snapshot", mounts_, aliases=["m", "mount"])
    m.add_argument("target", help="where the snapshot would be mounted")
    m.add_argument("key")

    for name, func, help in (("prepare", prepare, "make an active (writable) snapshot of a committed one"),
                             ("view", view, "make a read-only snapshot of a committed one")):
        c = action(name, help, func)
        c.add_argument("-t", "--target", metavar="DIR", help="also mount the snapshot on DIR (an existing directory)")
        c.add_argument("--mounts", action="store_true", help="print the snapshot's mounts as JSON")
        c.add_argument("key")
        c.add_argument("parent", nargs="?", default="")

    c = action("commit", "commit an active snapshot as NAME", commit)
    c.add_argument("name")
    c.add_argument("key", help="the active snapshot")

    rm = action("rm", "remove snapshots; print each one removed", remove, aliases=["delete", "del", "remove"])
    rm.add_argument("keys", nargs="+", metavar="KEY")

    u = action("usage", "disk usage of snapshots (all, or the KEYs given)", usage)
    u.add_argument("-b", action="store_true", help="sizes in bytes")
    u.add_argument("keys", nargs="*", metavar="KEY")

    d = action("diff", "store what a snapshot changes over its parent as a layer; print its digest", diff)
    d.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label for the layer blob (repeatable)")
    d.add_argument("--keep", action="store_true",
                   help="keep the layer: label it containerd.io/gc.root (otherwise GC may take it)")
    d.add_argument("key", help="an active or committed snapshot")

    i = action("info", "a snapshot's info as JSON", info)
    i.add_argument("key")

    lb = action("label", "set and clear labels of a snapshot (KEY= clears); print its labels", label)
    lb.add_argument("key")
    lb.add_argument("labels", nargs="*", metavar="KEY=VALUE")


def list_(client, args) -> int:
    snapshots = client.snapshots.list(args.filters, snapshotter=args.snapshotter)
    if args.quiet:
        for s in snapshots:
            print(s["name"])
    elif args.format == "json":
        as_json(snapshots)
    else:
        table(["KEY", "PARENT", "KIND"],
              [[s["name"], s["parent"], KIND_TITLES.get(s["kind"], s["kind"])] for s in snapshots])
    return 0


def tree(client, args) -> int:
    snapshots = client.snapshots.list(snapshotter=args.snapshotter)
    names = {s["name"] for s in snapshots}
    children: dict[str, list[str]] = {}
    for s in snapshots:
        children.setdefault(s["parent"] if s["parent"] in names else "", []).append(s["name"])

    def show(name: str, level: int) -> None:
        print("  " * level + ("\\_" if level else "") + " " + name)
        for child in children.get(name, ()):
            show(child, level + 1)
    for root in children.get("", ()):
        show(root, 0)
    return 0


def mount_commands(target: str, mounts: list[dict]) -> list[list[str]]:
    """ctr's lines: `mount -t TYPE SOURCE TARGET -o OPTIONS`, as argument lists."""
    return [["mount", "-t", m["type"], m["source"], target, "-o", ",".join(m["options"])] for m in mounts]


def mounts_(client, args) -> int:
    for cmd in mount_commands(args.target, client.snapshots.mounts(args.key, snapshotter=args.snapshotter)):
        print(" ".join(cmd))
    return 0


def prepare(client, args) -> int:
    return _create(client, args, client.snapshots.prepare)


def view(client, args) -> int:
    return _create(client, args, client.snapshots.view)


def _create(client, args, make) -> int:
    if args.target and not os.path.isdir(args.target):
        print(f"berth: mount target {args.target}: not a directory", file=sys.stderr)
        return 1
    mounts = make(args.key, args.parent, {GC_ROOT: _now()}, snapshotter=args.snapshotter)
    if args.target:
        for cmd in mount_commands(args.target, mounts):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or [f"mount exited {done.returncode}"])[-1]
                print(f"berth: snapshot {args.key} is made, but mounting it on {args.target} failed: {why}",
                      file=sys.stderr)
                return 1
    if args.mounts:
        as_json(mounts)
    return 0


def commit(client, args) -> int:
    client.snapshots.commit(args.name, args.key, {GC_ROOT: _now()}, snapshotter=args.snapshotter)
    return 0


def remove(client, args) -> int:
    return remove_each(args.keys, lambda key: client.snapshots.remove(key, snapshotter=args.snapshotter),
                       "snapshot")[0]


def usage(client, args) -> int:
    keys = args.keys or [s["name"] for s in client.snapshots.list(snapshotter=args.snapshotter)]
    rows = []
    for key in keys:
        u = client.snapshots.usage(key, snapshotter=args.snapshotter)
        rows.append([key, str(u["size"]) if args.b else human_size(u["size"]), u["inodes"]])
    table(["KEY", "SIZE", "INODES"], rows)
    return 0


def diff(client, args) -> int:
    """ctr's `snapshots diff KEY`, but printing the layer's digest where ctr writes the layer
    itself to stdout (`content get DIGEST` gives the bytes). The diff is made under a lease of its
    own, deleted at the end, as ctr does; without --keep or a gc.root label the layer lasts only
    until the next GC."""
    labels = {k: v for k, v in parse_labels(args.label).items() if v}
    if args.keep:
        labels[GC_ROOT] = _now()
    with client.lease(expire=3600):
        desc = client.snapshots.diff(args.key, labels, snapshotter=args.snapshotter)
        if labels:                # the same layer stored before keeps its old labels otherwise
            client.content.set_labels(desc["digest"], labels)
    print(desc["digest"])
    return 0


def info(client, args) -> int:
    as_json(client.snapshots.stat(args.key, snapshotter=args.snapshotter))
    return 0


def label(client, args) -> int:
    s = client.snapshots.set_labels(args.key, parse_labels(args.labels), snapshotter=args.snapshotter)
    print(",".join(f"{k}={v}" for k, v in sorted(s["labels"].items())))
    return 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
