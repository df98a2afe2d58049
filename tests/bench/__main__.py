"""`make bench`: every benchmark section in turn, each printing its figures."""
from __future__ import annotations

import argparse
import importlib
import sys

SECTIONS = ["bus", "pull", "tasks"]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench")
    p.add_argument("sections", nargs="*", default=SECTIONS, help=f"any of {SECTIONS}")
    args = p.parse_args()
    for name in args.sections:
        print(f"\n== {name} ==", flush=True)
        importlib.import_module(f"tests.bench.{name}").run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
