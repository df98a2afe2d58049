"""Checkpoints in the content store: a CRIU image directory as one tar blob, and back.

The runtime actor dumps a task into a scratch directory, then `store` writes it to the content
store as an uncompressed tar (containerd's media type for it), under the caller's lease; a
restore `fetch`es the blob into the new task's directory. The client makes the image around it
(berth/client.py, Task.checkpoint), as containerd's client does.

The tar comes from the content store, so it is read as any image's would be: only regular files
and directories, every name inside the destination (tarfile's "data" filter), and a cap on the
bytes written.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from typing import Callable

from bus.errors import InvalidArgument

MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CHUNK = 4 << 20                     # the content actor's largest read or write
MAX_SIZE = 64 << 30                 # what a restore unpacks at most

Call = Callable[..., object]         # an actor's `call(service, method, args, **kw)`


def store(call: Call, ns: str, lease: str | None, image_dir: str, scratch: str, ref: str) -> dict:
    """Tar `image_dir` (in a temporary file under `scratch`) into the content store; its descriptor."""
    with tempfile.TemporaryFile(dir=scratch) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(image_dir)):
                tar.add(os.path.join(image_dir, name), arcname=name)
        size = f.tell()
        f.seek(0)
        sha = hashlib.sha256()
        while chunk := f.read(CHUNK):
            sha.update(chunk)
        digest = f"sha256:{sha.hexdigest()}"
        f.seek(0)
        kw = {"namespace": ns, "lease": lease}
        call("content", "writer_open", {"ref": ref, "total": size, "expected": digest}, **kw)
        offset = 0
        while chunk := f.read(CHUNK):
            call("content", "write", {"ref": ref, "offset": offset}, frames=[chunk], **kw)
            offset += len(chunk)
        call("content", "commit", {"ref": ref, "size": size, "expected": digest}, **kw)
    return {"mediaType": MEDIA_TYPE, "digest": digest, "size": size}


def fetch(call: Call, ns: str, digest: str, dest: str, scratch: str) -> None:
    """Unpack the checkpoint blob `digest` into `dest` (made here, mode 0700)."""
    info = call("content", "info", {"digest": digest}, namespace=ns)
    if info.get("size", 0) > MAX_SIZE:
        raise InvalidArgument(f"checkpoint {digest} is {info['size']} bytes, over the {MAX_SIZE} allowed")
    with tempfile.TemporaryFile(dir=scratch) as f:
        offset = 0
        while offset < info["size"]:
            _, frames = call("content", "read", {"digest": digest, "offset": offset, "size": CHUNK},
                             namespace=ns, with_frames=True)
            if not frames or not frames[0]:
                break
            f.write(frames[0])
            offset += len(frames[0])
        f.seek(0)
        unpack(f, dest)


def unpack(fileobj, dest: str) -> None:
    """Regular files and directories only, every one inside `dest`."""
    os.makedirs(dest, mode=0o700)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            total = 0
            for member in tar:
                if not (member.isreg() or member.isdir()):
                    raise InvalidArgument(f"checkpoint entry {member.name!r} is neither a file nor a directory")
                total += member.size
                if total > MAX_SIZE:
                    raise InvalidArgument(f"checkpoint unpacks to more than {MAX_SIZE} bytes")
                tar.extract(member, dest, filter="data")
    except (tarfile.TarError, tarfile.FilterError) as e:
        raise InvalidArgument(f"checkpoint is not a usable CRIU image tar: {e}") from None
