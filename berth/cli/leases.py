"""`berth leases ls|create|rm`: leases hold content, ingests and snapshots against GC."""
from __future__ import annotations

import re

from berth.cli.output import add_format, as_json, labels_text, parse_labels, remove_each, table

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def register(sub) -> None:
    p = sub.add_parser("leases", aliases=["lease"], help="manage leases")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = cmds.add_parser("ls", aliases=["list"], help="list the leases")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the lease ids")
    add_format(ls)
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. 'id~=^berth-'")
    ls.set_defaults(func=list_)

    c = cmds.add_parser("create", help="create a lease; print its id")
    c.add_argument("--id", help="the lease's id (default: a generated one)")
    c.add_argument("-x", "--expires", default="24h", metavar="DURATION",
                   help="lifetime, as 24h, 90m or 1h30m; 0 never expires (default 24h)")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    c.set_defaults(func=create)

    rm = cmds.add_parser("rm", aliases=["delete", "remove"], help="delete leases; print each one deleted")
    rm.add_argument("--sync", action="store_true",
                    help="collect what the leases alone held before returning")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=remove)


def duration(text: str) -> float:
    """Go's duration syntax ("24h", "1h30m", "250ms"), or a plain number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    while pos < len(text) or pos == 0:
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise SystemExit(f"berth: invalid duration {text!r}: use e.g. 24h, 90m, 1h30m or 3600 (seconds)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def list_(client, args) -> int:
    leases = client.leases.list(args.filters)
    if args.quiet:
        for lease in leases:
            print(lease["id"])
    elif args.format == "json":
        as_json(leases)
    else:
        table(["ID", "CREATED AT", "LABELS"],
              [[lease["id"], rfc3339(lease["created_at"]), labels_text(lease["labels"])] for lease in leases])
    return 0


def create(client, args) -> int:
    expires = duration(args.expires)
    lease = client.leases.create(args.id, parse_labels(args.labels), expires or None)
    print(lease["id"])
    return 0


def remove(client, args) -> int:
    failed, deleted = remove_each(args.ids, client.leases.delete, "lease")
    if args.sync and deleted:
        client.gc()                  # one collection for them all, done before we return
    return failed


def rfc3339(ts: float) -> str:
    """Local time with its offset, to the second, as ctr prints times."""
    import datetime
    text = datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text
