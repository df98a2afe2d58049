"""berth's public face: the client library (`berth.Client`) and the `berth` command."""
from __future__ import annotations

from berth.version import VERSION as __version__

__all__ = ["Client", "__version__"]


def __getattr__(name):
    # The client pulls in ZeroMQ; import it only when asked for, so `berth --help` stays quick.
    if name == "Client":
        from berth.client import Client
        return Client
    raise AttributeError(name)
