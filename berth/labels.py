"""The well-known labels berth shares with containerd, in one place: GC roots and references,
lease expiry, and a layer's uncompressed digest."""

GC_PREFIX = "containerd.io/gc."                          # every label GC reads starts so
GC_ROOT = "containerd.io/gc.root"                        # keeps a blob or snapshot by itself
GC_EXPIRE = "containerd.io/gc.expire"                    # RFC 3339 time a lease lapses at
GC_REF_CONTENT = "containerd.io/gc.ref.content"          # + ".m.<i>", ".config", ".l.<i>": children
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."       # + snapshotter: an image config's top snapshot
UNCOMPRESSED = "containerd.io/uncompressed"              # a layer blob's diffID
