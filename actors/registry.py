"""The one registry of actors: what each is, what it needs, where its code lives.

Health checks, restarts and `berth debug actors` read this list. `requires` names the actors
each one calls: shown to operators, and kept listed callees first; berthd starts them all at once.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    name: str
    module: str                      # exposes build(config) -> bus.worker.Actor
    requires: tuple[str, ...] = ()

    def build(self, config):
        return importlib.import_module(self.module).build(config)


ACTORS: list[ActorSpec] = [
    ActorSpec("events", "actors.events"),
    ActorSpec("metadata", "actors.metadata", requires=("events",)),
    ActorSpec("content", "actors.content", requires=("events", "metadata")),
    ActorSpec("snapshot", "actors.snapshot", requires=("events", "metadata", "content")),
    ActorSpec("transfer", "actors.transfer", requires=("metadata", "content")),
    ActorSpec("runtime", "actors.runtime", requires=("events", "metadata", "snapshot")),
]

BY_NAME = {spec.name: spec for spec in ACTORS}


def start_order() -> list[ActorSpec]:
    """Dependencies first; the list is written in that order, this checks it stays so."""
    seen: set[str] = set()
    for spec in ACTORS:
        missing = set(spec.requires) - seen
        if missing:
            raise RuntimeError(f"actor {spec.name} is listed before {sorted(missing)}")
        seen.add(spec.name)
    return list(ACTORS)
