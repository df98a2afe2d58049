"""`berth debug actors|info|failpoints`: the daemon's own view of itself, the first place to
look; and its failpoints, to make it fail on purpose (docs/failpoints.md)."""
from __future__ import annotations

from berth.cli.output import add_format, as_json, table


def register(sub) -> None:
    p = sub.add_parser("debug", help="inspect berthd itself")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = cmds.add_parser("actors", help="the actors: pid, status, restarts, renewals, queue depths")
    add_format(a)
    a.set_defaults(func=actors)
    i = cmds.add_parser("info", help="daemon paths, addresses and version")
    i.set_defaults(func=lambda client, args: as_json(client.info()) or 0)
    f = cmds.add_parser("failpoints", help="fault injection: set, list or clear failpoints (docs/failpoints.md)")
    fcmds = f.add_subparsers(dest="failpoints_action", metavar="ACTION", required=True)
    s = fcmds.add_parser("set", help="set failpoint NAME to TERM in every berthd process, e.g. "
                                     "`content.commit '1*crash'`")
    s.add_argument("name", help="a failpoint site, e.g. content.commit or worker.dispatch.content.info")
    s.add_argument("term", help="[N*]crash, [N*]error(Code), [N*]delay(ms) or [N*]off, chained with ->")
    s.set_defaults(func=set_failpoint)
    ls = fcmds.add_parser("ls", help="the failpoints set, with the counts they have left")
    add_format(ls)
    ls.set_defaults(func=list_failpoints)
    c = fcmds.add_parser("clear", help="clear failpoint NAME, or every failpoint")
    c.add_argument("name", nargs="?", help="the failpoint to clear (default: all)")
    c.set_defaults(func=clear_failpoints)


def actors(client, args) -> int:
    state = client.actors()
    if args.format == "json":
        as_json(state)
        return 0
    queued = state["router"]["queued"]
    rows = [[a["name"], a["pid"] or "-", a["status"], a["restarts"], a.get("renewals", 0), f"{a['uptime']:.0f}s",
             queued.get(a["name"], 0), a["stats"].get("in_flight", 0), ",".join(a["requires"]) or "-"]
            for a in state["actors"]]
    table(["ACTOR", "PID", "STATUS", "RESTARTS", "RENEWALS", "UPTIME", "QUEUED", "IN-FLIGHT", "REQUIRES"], rows)
    return 0


def set_failpoint(client, args) -> int:
    failpoint = client.set_failpoint(args.name, args.term)
    print(f"{failpoint['name']}={failpoint['term']}")
    return 0


def list_failpoints(client, args) -> int:
    failpoints = client.failpoints()
    if args.format == "json":
        as_json(failpoints)
    else:
        table(["NAME", "TERM"], [[f["name"], f["term"]] for f in failpoints])
    return 0


def clear_failpoints(client, args) -> int:
    for name in client.clear_failpoints(args.name):
        print(name)
    return 0
