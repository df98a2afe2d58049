"""The metadata service: namespaces (and, as berth grows, images, containers and leases).

`MetadataStore` is the logic over one SQLite database in WAL mode, every change a transaction;
`MetadataActor` is its wire adapter. Events go out through the publisher after each commit.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from typing import Callable

from bus.errors import AlreadyExists, FailedPrecondition, NotFound
from bus.validate import Identifier, Labels, check_labels
from bus.worker import Actor, method

Publish = Callable[[str | None, str, dict], None]

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Tables whose rows belong to a namespace; a namespace holding any of them cannot be deleted.
NAMESPACED_TABLES: list[str] = []


def apply_fieldpaths(current: dict, labels: dict, fieldpaths: list[str]) -> dict:
    """containerd's update rule: named `labels.k` paths change alone (empty deletes); none, replace all."""
    if not fieldpaths:
        return {k: v for k, v in labels.items() if v != ""}
    merged = dict(current)
    for path in fieldpaths:
        if path == "labels":
            merged = dict(labels)
            continue
        key = path.removeprefix("labels.")
        if labels.get(key, ""):
            merged[key] = labels[key]
        else:
            merged.pop(key, None)
    return merged


class MetadataStore:
    def __init__(self, path: str, publish: Publish = lambda ns, topic, event: None, clock=time.time):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.publish = publish
        self.clock = clock

    @contextlib.contextmanager
    def tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # --- namespaces ----------------------------------------------------------------------

    def create_namespace(self, name: str, labels: dict | None = None) -> dict:
        labels = check_labels(labels or {})
        now = self.clock()
        with self.tx() as db:
            if db.execute("SELECT 1 FROM namespaces WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"namespace {name} already exists")
            db.execute("INSERT INTO namespaces VALUES (?,?,?,?)", (name, json.dumps(labels), now, now))
        self.publish(name, "/namespaces/create", {"name": name, "labels": labels})
        return self.get_namespace(name)

    def ensure_namespace(self, db: sqlite3.Connection, name: str) -> None:
        """Objects created in a namespace bring it into being, as containerd's do."""
        if db.execute("SELECT 1 FROM namespaces WHERE name=?", (name,)).fetchone() is None:
            now = self.clock()
            db.execute("INSERT INTO namespaces VALUES (?,?,?,?)", (name, "{}", now, now))
            self.publish(name, "/namespaces/create", {"name": name, "labels": {}})

    def get_namespace(self, name: str) -> dict:
        row = self.db.execute("SELECT name, labels, created_at, updated_at FROM namespaces WHERE name=?",
                              (name,)).fetchone()
        if row is None:
            raise NotFound(f"namespace {name} not found")
        return _namespace(row)

    def list_namespaces(self) -> list[dict]:
        rows = self.db.execute("SELECT name, labels, created_at, updated_at FROM namespaces ORDER BY name")
        return [_namespace(r) for r in rows]

    def update_namespace(self, name: str, labels: dict, fieldpaths: list[str] = ()) -> dict:
        check_labels(labels)
        with self.tx() as db:
            current = self.get_namespace(name)["labels"]
            merged = apply_fieldpaths(current, labels, list(fieldpaths))
            db.execute("UPDATE namespaces SET labels=?, updated_at=? WHERE name=?",
                       (json.dumps(merged), self.clock(), name))
        self.publish(name, "/namespaces/update", {"name": name, "labels": merged})
        return self.get_namespace(name)

    def delete_namespace(self, name: str) -> None:
        with self.tx() as db:
            self.get_namespace(name)
            for table in NAMESPACED_TABLES:
                if db.execute(f"SELECT 1 FROM {table} WHERE namespace=? LIMIT 1", (name,)).fetchone():
                    raise FailedPrecondition(f"namespace {name} must be empty, but it still has {table}")
            db.execute("DELETE FROM namespaces WHERE name=?", (name,))
        self.publish(name, "/namespaces/delete", {"name": name})


def _namespace(row) -> dict:
    return {"name": row[0], "labels": json.loads(row[1]), "created_at": row[2], "updated_at": row[3]}


class MetadataActor(Actor):
    name = "metadata"

    def __init__(self, store: MetadataStore, publisher=None):
        self.store = store
        self.publisher = publisher

    def on_stop(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.store.close()

    @method
    def create_namespace(self, name: Identifier, labels: Labels | None = None) -> dict:
        return self.store.create_namespace(name, labels)

    @method
    def get_namespace(self, name: Identifier) -> dict:
        return self.store.get_namespace(name)

    @method
    def list_namespaces(self) -> list[dict]:
        return self.store.list_namespaces()

    @method
    def update_namespace(self, name: Identifier, labels: Labels, fieldpaths: list[str] | None = None) -> dict:
        return self.store.update_namespace(name, labels, fieldpaths or [])

    @method
    def delete_namespace(self, name: Identifier) -> None:
        self.store.delete_namespace(name)


def build(config) -> MetadataActor:
    from bus.pubsub import Publisher
    publisher = Publisher(config.address, config.path("spool", "metadata"))
    return MetadataActor(MetadataStore(config.path("metadata", "meta.db"), publisher.publish), publisher)
