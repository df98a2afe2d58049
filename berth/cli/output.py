"""Printing for the CLI: aligned tables (as ctr's tabwriter), JSON, and one-line errors."""
from __future__ import annotations

import sys


def table(headers: list[str], rows: list[list], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def as_json(obj, out=None) -> None:
    import json                 # here: most commands print tables, and json's import costs them
    (out or sys.stdout).write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def labels_text(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def parse_labels(pairs: list[str]) -> dict:
    """`k=v` words into a dict; `k=` (or a bare `k`) means an empty value, which removes k."""
    labels = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key:
            raise SystemExit(f"berth: bad label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def add_format(parser) -> None:
    parser.add_argument("--format", choices=["table", "json"], default="table", help="output format")


def remove_each(names: list[str], delete, what: str, *, missing_ok: bool = False, echo: bool = True) -> tuple[int, int]:
    """ctr's `rm` commands: delete each name in turn, printing it; a failure is one `berth:` line
    and exit status 1, and the rest go on. With missing_ok, a name that is not there only warns.
    Returns (exit status, how many were deleted)."""
    from bus.errors import BerthError, NotFound
    failed = deleted = 0
    for name in names:
        try:
            delete(name)
        except NotFound as e:
            print(f"berth: {what} {name}: not found" if missing_ok else f"berth: unable to delete {what} {name}: {e}",
                  file=sys.stderr)
            failed = failed or int(not missing_ok)
            continue
        except BerthError as e:
            print(f"berth: unable to delete {what} {name}: {e}", file=sys.stderr)
            failed = 1
            continue
        deleted += 1
        if echo:
            print(name)
    return failed, deleted
