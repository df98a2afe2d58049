"""berthd's configuration: TOML file, then command-line flags on top."""
from __future__ import annotations

import dataclasses
import os

from bus.client import zmq_address
from bus.errors import InvalidArgument

DEFAULT_CONFIG = "/etc/berth/config.toml"


@dataclasses.dataclass
class Config:
    root: str = "/var/lib/berth"
    state: str = "/run/berth"
    address: str = ""                        # the client socket; default <state>/berth.sock
    log_level: str = "info"
    metrics_address: str = "127.0.0.1:1338"  # empty: no metrics endpoint
    events_log_size: int = 100_000           # events kept for replay
    failpoints: str = ""                     # name=term;... (bus.failpoints); BERTH_FAILPOINTS adds to it
    transfer_renew_after: float = 10.0       # idle seconds after a pull or push before transfer starts afresh

    def __post_init__(self):
        self.root = os.path.abspath(self.root)
        self.state = os.path.abspath(self.state)
        self.address = os.path.abspath(self.address) if self.address else os.path.join(self.state, "berth.sock")

    @property
    def actors_address(self) -> str:
        return zmq_address(os.path.join(self.state, "actors.sock"))

    @property
    def events_address(self) -> str:
        return zmq_address(os.path.join(self.state, "events.sock"))

    @property
    def metrics_dir(self) -> str:
        return os.path.join(self.state, "metrics")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @classmethod
    def load(cls, path: str | None, **overrides) -> "Config":
        """Read the TOML file (missing default file is fine), then apply non-None overrides."""
        values: dict = {}
        if path or os.path.exists(DEFAULT_CONFIG):
            values = _from_toml(path or DEFAULT_CONFIG)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _from_toml(path: str) -> dict:
    import tomllib                    # only with a file to read: berthd starts faster without one
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"config {path}: {e}") from None
    values = {k: doc[k] for k in ("root", "state", "address", "log_level", "failpoints") if k in doc}
    if "address" in doc.get("metrics", {}):
        values["metrics_address"] = doc["metrics"]["address"]
    if "log_size" in doc.get("events", {}):
        values["events_log_size"] = int(doc["events"]["log_size"])
    transfer = doc.get("transfer", {})
    if not isinstance(transfer, dict) or set(transfer) - {"renew_after"}:
        raise InvalidArgument(f"config {path}: [transfer] takes one key, renew_after (seconds)")
    if "renew_after" in transfer:
        values["transfer_renew_after"] = _seconds(transfer["renew_after"], f"config {path}: transfer.renew_after")
    unknown = set(doc) - {"root", "state", "address", "log_level", "metrics", "events", "transfer", "failpoints"}
    if unknown:
        raise InvalidArgument(f"config {path}: unknown key {sorted(unknown)[0]!r}")
    return values


def _seconds(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidArgument(f"{what} must be a number of seconds, not {value!r}")
    return float(value)
