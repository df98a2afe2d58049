"""`berth version`: the client's and the daemon's versions."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("version", help="print the client and server versions")
    p.set_defaults(func=run)


def run(client, args) -> int:
    from berth.version import VERSION
    print(f"Client:\n  Version:  {VERSION}\n")
    print(f"Server:\n  Version:  {client.version()['server']}")
    return 0
