"""`berth gc`: collect garbage now and say what went."""
from __future__ import annotations

from berth.cli.output import as_json


def register(sub) -> None:
    p = sub.add_parser("gc", help="remove content nothing holds: no image, container, lease or gc.root label")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    p.set_defaults(func=run)


def run(client, args) -> int:
    result = client.gc()
    if args.format == "json":
        as_json(result)
        return 0
    content = result.get("content", {})
    print(f"removed {_count(content.get('removed', 0), 'blob')}, "
          f"{_count(content.get('orphans', 0), 'orphaned blob file')}, "
          f"{_count(content.get('ingests', 0), 'expired ingest')} in {result.get('seconds', 0)}s")
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
