"""`berth`: the command line, shaped like containerd's `ctr` so its users' habits carry over."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command groups, each a module in berth.cli with register(subparsers).
GROUPS = ["version", "namespaces", "content", "snapshots", "images", "pull", "containers", "tasks", "run",
          "leases", "gc", "events", "debug"]


class Parser(argparse.ArgumentParser):
    """argparse's parser (and, through add_subparsers, every subcommand's), with one difference:
    its formatters get the terminal's width from `terminal_columns` instead of shutil. argparse
    makes a formatter for each add_argument, to check the metavar, and shutil's import (with
    zlib, bz2 and lzma) would cost every command about 2.5 ms for help seldom printed."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=terminal_columns() - 2)


def terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line, only the group it names (when it names one by
    its module's name), since each group's import and parser cost every command's start-up."""
    p = Parser(prog="berth", description="berth: a container runtime. Talks to berthd.")
    p.add_argument("-a", "--address", default=os.environ.get("BERTH_ADDRESS", "/run/berth/berth.sock"),
                   help="berthd's socket (env BERTH_ADDRESS; default %(default)s)")
    p.add_argument("-n", "--namespace", default=os.environ.get("BERTH_NAMESPACE", "default"),
                   help="namespace to work in (env BERTH_NAMESPACE; default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for berthd (default 30)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    command = _command_word(argv or [])
    for group in [command] if command in GROUPS else GROUPS:
        importlib.import_module(f"berth.cli.{group}").register(sub)
    return p


def _command_word(argv: list[str]) -> str | None:
    """The first word of `argv` that is not a global option or its value."""
    words = iter(argv)
    for word in words:
        if word in ("-a", "--address", "-n", "--namespace", "--timeout"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from bus.errors import BerthError
    try:
        from berth.client import Client
        client = Client(args.address, args.namespace, timeout=args.timeout)
        code = args.func(client, args)
    except BerthError as e:
        print(f"berth: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
