"""berthd's config file: the keys it knows, their defaults, and a clear error for a bad one."""
from __future__ import annotations

import os

import pytest

from actors.config import Config
from bus.errors import InvalidArgument
from tests.support import REPO


def load(tmp_path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return Config.load(str(path), root=str(tmp_path / "root"), state=str(tmp_path / "state"))


def test_transfer_renew_after_defaults_to_ten_seconds(tmp_path):
    assert load(tmp_path, "").transfer_renew_after == 10.0


@pytest.mark.parametrize("value, seconds", [("0", 0.0), ("2.5", 2.5), ("60", 60.0)])
def test_transfer_renew_after_is_read_from_its_table(tmp_path, value, seconds):
    assert load(tmp_path, f"[transfer]\nrenew_after = {value}\n").transfer_renew_after == seconds


@pytest.mark.parametrize("text, message", [
    ("[transfer]\nrenew_after = -1\n", "must be a number of seconds"),
    ('[transfer]\nrenew_after = "10s"\n', "must be a number of seconds"),
    ("[transfer]\nrenew_after = true\n", "must be a number of seconds"),
    ("[transfer]\nidle = 3\n", "takes one key, renew_after"),
    ("transfer = 3\n", "takes one key, renew_after"),
    ("[transfers]\nrenew_after = 1\n", "unknown key 'transfers'"),
])
def test_a_bad_transfer_table_is_invalid_argument(tmp_path, text, message):
    with pytest.raises(InvalidArgument, match=message):
        load(tmp_path, text)


def test_the_example_config_says_the_defaults():
    example = os.path.join(REPO, "systemd", "config.toml.example")
    assert Config.load(example) == Config()
