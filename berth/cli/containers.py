"""`berth containers create|ls|info|rm|label`: containers (their tasks are `berth tasks`)."""
from __future__ import annotations

import argparse

from berth.cli.output import add_format, as_json, labels_text, parse_labels, remove_each, table

DEFAULT_RUNTIME = "io.containerd.runc.v2"


def register(sub) -> None:
    p = sub.add_parser("containers", aliases=["container", "c"], help="manage containers")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = cmds.add_parser("create", help="create a container from an image: its snapshot, spec and record")
    from berth.cli.run import add_container_options
    add_container_options(c)
    c.set_defaults(runtime=DEFAULT_RUNTIME)
    c.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("id", metavar="ID")
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command (default: the image's)")
    c.set_defaults(func=create)

    ls = cmds.add_parser("ls", aliases=["list"], help="list containers")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the container ids")
    add_format(ls)
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. 'image==busybox:latest'")
    ls.set_defaults(func=list_)

    info = cmds.add_parser("info", help="print a container's record as JSON")
    info.add_argument("id", metavar="ID")
    info.set_defaults(func=info_)

    rm = cmds.add_parser("rm", aliases=["delete", "del", "remove"], help="delete container records")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=remove)

    lb = cmds.add_parser("label", help="set and clear labels of a container (KEY= clears); print its labels")
    lb.add_argument("id", metavar="ID")
    lb.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    lb.set_defaults(func=label)


def create(client, args) -> int:
    """As ctr: the image must be known. Where its manifest and config are in the content store, the
    container gets a snapshot and a spec (it can be started); otherwise only its record is made."""
    from berth.cli.run import spec_options
    from berth.client import image_config
    from bus.errors import NotFound
    image = client.images.get(args.image)
    labels = parse_labels(args.label)
    try:
        image_config(client, image)
    except NotFound:
        client.containers.create(args.id, runtime=args.runtime, image=args.image, labels=labels)
        return 0
    client.containers.new(args.id, image, spec_opts=spec_options(args, args.tty), snapshotter=args.snapshotter,
                          runtime=args.runtime, labels=labels, args=args.args or None)
    return 0


def list_(client, args) -> int:
    containers = client.containers.list(args.filters)
    if args.quiet:
        for c in containers:
            print(c["id"])
    elif args.format == "json":
        as_json(containers)
    else:
        table(["CONTAINER", "IMAGE", "RUNTIME"],
              [[c["id"], c["image"] or "-", c["runtime"].get("name", "-")] for c in containers])
    return 0


def info_(client, args) -> int:
    as_json(client.containers.get(args.id))
    return 0


def remove(client, args) -> int:
    # The container's snapshot goes with it, as with ctr.
    return remove_each(args.ids, lambda cid: client.containers.load(cid).delete(snapshot=True), "container",
                       echo=False)[0]


def label(client, args) -> int:
    container = client.containers.set_labels(args.id, parse_labels(args.labels))
    print(labels_text(container["labels"]))
    return 0
