"""The one registry of actors: what each is, what it needs, where its code lives.

Health checks, restarts and `berth debug actors` read this list. `requires` names the actors
each one calls: shown to operators, and kept listed callees first; berthd starts them all at once,
the slowest to start (`starts_first`) before the others.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    name: str
    module: str                      # exposes build(config) -> bus.worker.Actor
    requires: tuple[str, ...] = ()
    starts_first: bool = False       # its start is the longest: forked before the others

    def build(self, config):
        return importlib.import_module(self.module).build(config)


ACTORS: list[ActorSpec] = [
    ActorSpec("events", "actors.events"),
    ActorSpec("metadata", "actors.metadata", requires=("events",)),
    ActorSpec("content", "actors.content", requires=("events", "metadata")),
    ActorSpec("snapshot", "actors.snapshot", requires=("events", "metadata", "content")),
    ActorSpec("transfer", "actors.transfer", requires=("metadata", "content")),
    # It finds its shims again before it answers: a restart is over when it is.
    ActorSpec("runtime", "actors.runtime", requires=("events", "metadata", "snapshot"),
              starts_first=True),
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


def spawn_order() -> list[ActorSpec]:
    """The order in which berthd forks its actors: those that start slowest first."""
    return sorted(ACTORS, key=lambda spec: not spec.starts_first)
