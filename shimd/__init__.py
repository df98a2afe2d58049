"""The shim: one process per container that owns the container's life."""
