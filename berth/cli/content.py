"""`berth content ls|get|fetch|ingest|active|rm|label|fsck`: the content store, as ctr shows it.

`content fetch` is ctr's: it fetches all the content of an image for a platform, and, as
containerd's client.Fetch does, records the image too; unlike `images pull` it never unpacks.
"""
from __future__ import annotations

import sys
import time

from berth.cli.output import add_format, as_json, labels_text, parse_labels, remove_each, table


def register(sub) -> None:
    p = sub.add_parser("content", help="manage content (blobs and ingests)")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = cmds.add_parser("ls", aliases=["list"], help="list the blobs in the store")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the digests")
    add_format(ls)
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. 'labels.\"k\"==v'; any one may match")
    ls.set_defaults(func=list_)

    get = cmds.add_parser("get", help="write a blob's bytes to stdout")
    get.add_argument("digest")
    get.set_defaults(func=get_)

    from berth.cli.pull import add_pull_arguments
    fetch = cmds.add_parser("fetch", help="fetch all content of an image from a registry (no unpack)")
    add_pull_arguments(fetch)
    fetch.set_defaults(func=fetch_)

    ing = cmds.add_parser("ingest", help="store what stdin holds under REF; print its digest")
    ing.add_argument("--expected-size", type=int, metavar="N", help="fail unless stdin holds exactly N bytes")
    ing.add_argument("--expected-digest", metavar="DIGEST", help="fail unless stdin's digest is DIGEST")
    ing.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the blob (repeat)")
    ing.add_argument("ref", help="names the write; running again with the same REF resumes it")
    ing.set_defaults(func=ingest)

    act = cmds.add_parser("active", help="list the writes in progress")
    act.add_argument("-q", "--quiet", action="store_true", help="print only the refs")
    add_format(act)
    act.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. 'ref~=^layer-'")
    act.set_defaults(func=active)

    rm = cmds.add_parser("rm", aliases=["delete", "del", "remove"], help="delete blobs; print each one deleted")
    rm.add_argument("digests", nargs="+", metavar="DIGEST")
    rm.set_defaults(func=remove)

    lb = cmds.add_parser("label", help="set and clear labels of a blob (KEY= clears); print its labels")
    lb.add_argument("digest")
    lb.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    lb.set_defaults(func=label)

    fk = cmds.add_parser("fsck", help="hash every blob again; report corrupt, missing, orphan and unknown files")
    fk.add_argument("--json", action="store_true", help="print the report as JSON")
    fk.set_defaults(func=fsck)


def list_(client, args) -> int:
    blobs = client.content.list(args.filters)
    if args.quiet:
        for info in blobs:
            print(info["digest"])
    elif args.format == "json":
        as_json(blobs)
    else:
        now = time.time()
        table(["DIGEST", "SIZE", "AGE", "LABELS"],
              [[b["digest"], human_size(b["size"]), human_duration(now - b["created_at"]), labels_text(b["labels"])]
               for b in blobs])
    return 0


def get_(client, args) -> int:
    out = sys.stdout.buffer
    for chunk in client.content.read(args.digest):
        out.write(chunk)
    out.flush()
    return 0


def fetch_(client, args) -> int:
    from berth.cli.pull import pull
    return pull(client, args, unpack=False)


def ingest(client, args) -> int:
    info = client.content.write(args.ref, sys.stdin.buffer, total=args.expected_size,
                                expected=args.expected_digest or None, labels=parse_labels(args.label))
    print(info["digest"])
    return 0


def active(client, args) -> int:
    statuses = client.content.list_statuses(args.filters)
    if args.quiet:
        for status in statuses:
            print(status["ref"])
    elif args.format == "json":
        as_json(statuses)
    else:
        now = time.time()
        table(["REF", "SIZE", "AGE"],
              [[s["ref"], human_size(s["offset"]), human_duration(now - s["started_at"])] for s in statuses])
    return 0


def remove(client, args) -> int:
    return remove_each(args.digests, client.content.delete, "content", missing_ok=True)[0]


def label(client, args) -> int:
    info = client.content.set_labels(args.digest, parse_labels(args.labels))
    print(labels_text(info["labels"]))
    return 0


def fsck(client, args) -> int:
    """Exit status 1 when anything is reported: a corrupt or missing blob, an orphan, an unknown file."""
    report = client.content.fsck()
    findings = [("corrupt", d["digest"], f"{d['problem']}: recorded {d['size']} bytes, has "
                 f"{'-' if d['actual_size'] is None else d['actual_size']} bytes hashing to "
                 f"{d['actual_digest'] or '-'} (namespaces {','.join(d['namespaces'])})") for d in report["corrupt"]]
    findings += [("missing", d["digest"], f"recorded but no file (namespaces {','.join(d['namespaces'])})")
                 for d in report["missing"]]
    findings += [("orphan", digest, "no namespace sees it; berth gc removes it") for digest in report["orphans"]]
    findings += [("unknown", name, "not a blob") for name in report["unknown"]]
    if args.json:
        as_json(report)
    else:
        print(f"checked {report['checked']} blobs, {human_size(report['bytes'])}")
        if findings:
            table(["PROBLEM", "BLOB", "DETAIL"], [list(f) for f in findings])
    return 1 if findings else 0


# --- shared by the groups that print sizes and ages ------------------------------------------

def human_size(size: int | None) -> str:
    """Bytes in binary units with one decimal, as ctr prints them: "512 B", "1.2 MiB"."""
    if size is None or size < 0:
        return "-"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} EiB"


def human_duration(seconds: float) -> str:
    """A rough age, as ctr prints it: "Less than a second", "2 minutes", "About an hour"."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 2:
        return "1 second"
    minutes = int(seconds // 60)
    hours = int(seconds / 3600 + 0.5)        # rounded half up, as ctr does
    if minutes < 1:
        return f"{int(seconds)} seconds"
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{int(seconds // 3600) // (24 * 365)} years"
