"""berth.cli.main.Parser: argparse's parser with the terminal width read without shutil, so its
help, usage and errors must read exactly as plain argparse's."""
import argparse
import shutil

import pytest

from berth.cli import main


def every_text(parser: argparse.ArgumentParser) -> list[str]:
    """Help and usage of a parser and of all its subcommands, recursively."""
    texts = [parser.format_help(), parser.format_usage()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for _, sub in sorted(action.choices.items()):
                texts += every_text(sub)
    return texts


@pytest.mark.parametrize("columns", [None, "40", "200", "0", "wide"])
def test_help_reads_as_plain_argparse(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    ours = every_text(main.build_parser([]))
    monkeypatch.setattr(main, "Parser", argparse.ArgumentParser)
    plain = every_text(main.build_parser([]))
    assert len(ours) > 100                        # every group's commands were formatted
    assert ours == plain


@pytest.mark.parametrize("columns", [None, "1", "57", "0", "-3", "x"])
def test_terminal_columns_is_shutils(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert main.terminal_columns() == shutil.get_terminal_size().columns


def test_usage_errors_read_as_plain_argparse(monkeypatch, capsys):
    argv = ["run", "--cpus", "many", "busybox", "c1"]
    with pytest.raises(SystemExit):
        main.build_parser(argv).parse_args(argv)
    ours = capsys.readouterr().err
    monkeypatch.setattr(main, "Parser", argparse.ArgumentParser)
    with pytest.raises(SystemExit):
        main.build_parser(argv).parse_args(argv)
    assert "invalid float value: 'many'" in ours
    assert ours == capsys.readouterr().err
