"""What every store needs to make a change survive a crash."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable (the file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
