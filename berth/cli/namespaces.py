"""`berth namespaces create|ls|rm|label`."""
from __future__ import annotations

from berth.cli.output import add_format, as_json, labels_text, parse_labels, remove_each, table


def register(sub) -> None:
    p = sub.add_parser("namespaces", aliases=["namespace", "ns"], help="manage namespaces")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = cmds.add_parser("create", help="create a namespace")
    c.add_argument("name")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    c.set_defaults(func=create)
    ls = cmds.add_parser("ls", aliases=["list"], help="list namespaces")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the names")
    add_format(ls)
    ls.set_defaults(func=list_)
    rm = cmds.add_parser("rm", aliases=["remove"], help="remove empty namespaces")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=remove)
    lb = cmds.add_parser("label", help="set and clear labels of a namespace (KEY= clears)")
    lb.add_argument("name")
    lb.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    lb.set_defaults(func=label)


def create(client, args) -> int:
    client.namespaces.create(args.name, parse_labels(args.labels))
    return 0


def list_(client, args) -> int:
    namespaces = client.namespaces.list()
    if args.quiet:
        for ns in namespaces:
            print(ns["name"])
    elif args.format == "json":
        as_json(namespaces)
    else:
        table(["NAME", "LABELS"], [[ns["name"], labels_text(ns["labels"])] for ns in namespaces])
    return 0


def remove(client, args) -> int:
    return remove_each(args.names, client.namespaces.delete, "namespace")[0]


def label(client, args) -> int:
    ns = client.namespaces.set_labels(args.name, parse_labels(args.labels))
    print(labels_text(ns["labels"]))
    return 0
