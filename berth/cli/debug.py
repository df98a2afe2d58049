"""`berth debug actors|info`: the daemon's own view of itself, the first place to look."""
from __future__ import annotations

from berth.cli.output import add_format, as_json, table


def register(sub) -> None:
    p = sub.add_parser("debug", help="inspect berthd itself")
    cmds = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = cmds.add_parser("actors", help="the actors: pid, status, restarts, queue depths")
    add_format(a)
    a.set_defaults(func=actors)
    i = cmds.add_parser("info", help="daemon paths, addresses and version")
    i.set_defaults(func=lambda client, args: as_json(client.info()) or 0)


def actors(client, args) -> int:
    state = client.actors()
    if args.format == "json":
        as_json(state)
        return 0
    queued = state["router"]["queued"]
    rows = [[a["name"], a["pid"] or "-", a["status"], a["restarts"], f"{a['uptime']:.0f}s",
             queued.get(a["name"], 0), a["stats"].get("in_flight", 0), ",".join(a["requires"]) or "-"]
            for a in state["actors"]]
    table(["ACTOR", "PID", "STATUS", "RESTARTS", "UPTIME", "QUEUED", "IN-FLIGHT", "REQUIRES"], rows)
    return 0
