"""`python -m tests.chaos --duration SECONDS [--seed N] [--clients 4]`: exit status 1 on any violation."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos",
                                description="berthd under a workload while its processes are killed, "
                                            "then its invariants checked")
    p.add_argument("--duration", type=float, required=True, metavar="SECONDS", help="how long to kill for")
    p.add_argument("--seed", type=int, help="replay the schedule of an earlier run (default: a new one)")
    p.add_argument("--clients", type=int, default=4, help="threads running containers (default %(default)s)")
    p.add_argument("--long-running", type=int, default=2, metavar="N",
                   help="containers that run throughout and receive execs (default %(default)s)")
    p.add_argument("--keep-logs", action="store_true", help="keep berthd's logs even when nothing is wrong")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.long_running < 1:
        p.error("--duration, --clients and --long-running must be positive")
    from tests.chaos.runner import chaos
    return 0 if chaos(args.duration, args.seed, args.clients, args.long_running, args.keep_logs).ok else 1


if __name__ == "__main__":
    sys.exit(main())
