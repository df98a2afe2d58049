"""`berth events [--since N] [--filter …]`: the event bus, one line an event, as ctr prints it."""
from __future__ import annotations

import json
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("events", aliases=["event"], help="print events as they happen")
    p.add_argument("--since", type=int, metavar="SEQ",
                   help="first print the events after sequence number SEQ (0: all that are kept)")
    p.add_argument("--filter", action="append", default=[], metavar="EXPR",
                   help="e.g. 'topic==/tasks/exit,namespace==default'; repeat to OR filters")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: 'TIMESTAMP NAMESPACE TOPIC {event}'; json: one envelope a line")
    p.add_argument("--seq", action="store_true", help="prefix each text line with its sequence number")
    p.add_argument("--timeout", dest="stop_after", type=float, metavar="SECONDS",
                   help="stop after this long (default: run until interrupted)")
    p.set_defaults(func=run)


def run(client, args) -> int:
    from bus.filters import parse
    parse(args.filter)                       # a bad filter is an error before anything is printed
    out = sys.stdout
    for env in client.events.subscribe(since=args.since, filters=args.filter, timeout=args.stop_after):
        if args.format == "json":
            out.write(json.dumps(env, default=str) + "\n")
        else:
            prefix = f"{env['seq']} " if args.seq else ""
            out.write(f"{prefix}{format_time(env['timestamp'])} {env.get('namespace') or ''} "
                      f"{env['topic']} {json.dumps(env['event'], sort_keys=True, default=str)}\n")
        out.flush()
    return 0


def format_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e9):09d} +0000 UTC"
