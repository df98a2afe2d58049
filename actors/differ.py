"""The differ: apply a layer tar onto a directory, and write the tar of what a directory changes.

Pure logic, no sockets: the snapshot actor calls `apply_layer` to unpack a pulled layer into a
new snapshot and `write_changes` to turn a committed snapshot back into a layer (containerd's
`archive.Apply` and `archive.WriteDiff`, with the overlay and naive whiteout converters).

Two layouts, chosen by `mode`:

    overlay   `root` is the upper directory of a new overlayfs layer; the lowers are not visible
              in it. OCI whiteouts become overlay whiteouts (0:0 character devices) where a
              lower layer has something to hide, opaque markers become
              `trusted.overlay.opaque=y` (on the root, where overlayfs does not read it, also
              a whiteout for each name below).
    native    `root` is a full copy of the parent tree; whiteouts delete, opaque markers clear
              what the lower layers put in the directory.

A layer is hostile input. Every path operation happens on a directory descriptor obtained with
openat2(2) `RESOLVE_IN_ROOT` from a descriptor of `root`, and the last component is handled by
an *at() call that does not follow it: symlinks in a layer are legal and are followed while
resolving parents (as containerd's `fs.RootPath` does), but only ever inside `root`. Names that
climb out with `..`, whiteouts of `.` and `..`, entries that would replace the root, device
numbers that do not fit, oversized headers and decompression bombs are rejected with
`InvalidArgument`. chmod never follows a symlink (CVE-2021-32760); a hardlink to a symlink links
the symlink itself.

On any error the apply stops and raises; what was written so far stays in `root`, and the
caller must discard that directory (the snapshot actor removes the uncommitted snapshot).

We parse tar headers ourselves rather than with `tarfile`: the interpreter's tarfile reads GNU
long-name and PAX data of any declared size into memory before a caller can look at it, and
3.11 releases before 3.11.10 carry its backtracking header regexes (CVE-2024-6232). The parser
below follows Go's archive/tar, which containerd uses, where formats disagree (PAX records apply
to the next real entry, GNU long names win over PAX paths, header-only types carry no data).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import posixpath
import queue
import shutil
import stat
import threading
import zlib

try:                                # ISA-L inflates gzip about three times faster than zlib
    from isal import isal_zlib as inflate
except ImportError:                 # pragma: no cover - isal is a dependency; zlib is the fallback
    inflate = zlib
from typing import BinaryIO, Iterator

import zstandard

from bus.errors import BerthError, FailedPrecondition, Internal, InvalidArgument, ResourceExhausted

log = logging.getLogger("berth.differ")

MODE_OVERLAY = "overlay"
MODE_NATIVE = "native"
MODES = (MODE_OVERLAY, MODE_NATIVE)

# --- limits: a layer is hostile input -------------------------------------------------------------

MAX_ENTRY_SIZE = 64 << 30        # one file's declared size
MAX_TOTAL_SIZE = 128 << 30       # uncompressed bytes of one layer
MAX_RATIO = 1000                 # uncompressed : compressed, checked past RATIO_GRACE
RATIO_GRACE = 64 << 20           # uncompressed bytes allowed before the ratio is checked
MAX_META_SIZE = 1 << 20          # PAX and GNU long-name header data (Go's maxSpecialFileSize)
MAX_META_CHAIN = 32              # extension headers in a row before a real entry
MAX_NAME = 4096                  # PATH_MAX, for entry names and link targets
MAX_ENTRIES = 1 << 21            # entries in one layer
MAX_ID = 0xFFFFFFFE              # uid/gid: (uid_t)-1 means "leave unchanged" to chown
MAX_DEVICE = 0xFFFFFFFF          # major and minor must each fit in 32 bits

IN_CHUNK = 256 << 10             # compressed bytes per read from the blob
OUT_CHUNK = 1 << 20              # decompressed bytes per step (bounds each step of a bomb)
COPY_CHUNK = 1 << 20
QUEUE_DEPTH = 8                  # decompressed chunks in flight between the two threads

# --- tar and whiteout vocabulary -------------------------------------------------------------------

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"
XATTR_PAX_PREFIX = b"SCHILY.xattr."

REG, AREG, LNK, SYM, CHR, BLK, DIR, FIFO, CONT = b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"
PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
HEADER_ONLY = {LNK, SYM, CHR, BLK, DIR, FIFO}
KNOWN_TYPES = {REG, AREG, CONT} | HEADER_ONLY

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UNSUPPORTED_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}

# --- openat2(2) -------------------------------------------------------------------------------------

SYS_OPENAT2 = 437                # the same number on every architecture Linux added it for
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: bytes, flags: int, resolve: int = RESOLVE) -> int:
    """openat2(2): open `path` below `dirfd` with the `resolve` restrictions; raises OSError."""
    how = _OpenHow(flags, 0, resolve)
    for _ in range(16):                   # RESOLVE_IN_ROOT answers EAGAIN if a rename raced it
        fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    if err == errno.ENOSYS:
        raise Internal("openat2(2) is not available: berth needs Linux 5.6 or later to unpack layers")
    raise OSError(err, os.strerror(err), path)


def _proc(fd: int, name: bytes = b"") -> bytes:
    """A path naming the file `fd` refers to (or `name` in directory `fd`) without a lookup by name
    from `/`: the kernel jumps through the descriptor, so nothing above it can redirect it."""
    return b"/proc/self/fd/%d/%s" % (fd, name) if name else b"/proc/self/fd/%d" % fd


# --- entry names ------------------------------------------------------------------------------------

def _show(name: bytes) -> str:
    text = name.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 200 else text[:200] + "…")


def clean_name(raw: bytes, what: str = "entry") -> bytes:
    """The entry's path relative to the root, b"" for the root itself.

    A leading `/` is dropped (absolute names are read relative to the root, as containerd, GNU
    tar and Docker do: Distroless and kaniko layers carry them); a name that still climbs out
    with `..` after lexical cleaning is rejected, as is a NUL or an over-long name."""
    if b"\0" in raw:
        raise InvalidArgument(f"layer {what} {_show(raw)} contains a NUL byte")
    if len(raw) > MAX_NAME:
        raise InvalidArgument(f"layer {what} {_show(raw)} is longer than {MAX_NAME} bytes")
    name = posixpath.normpath(raw).lstrip(b"/") if raw else b"."
    if name == b".":
        return b""
    if name == b".." or name.startswith(b"../"):
        raise InvalidArgument(f"layer {what} {_show(raw)} points outside the root")
    return name


# --- decompression, hashing and the bounds on both -------------------------------------------------

class _Prefixed:
    """A blob whose first bytes were already read (to sniff the format)."""

    def __init__(self, head: bytes, blob: BinaryIO):
        self.head, self.blob = head, blob
        self.count = 0                    # bytes handed out: what a decompressor has taken in

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else \
                (self.head[:n], self.head[n:])
        else:
            data = self.blob.read(n)
        self.count += len(data)
        return data


def sniff(head: bytes, media_type: str = "") -> str:
    """"gzip", "zstd" or "tar", from the magic bytes; the media type is only a hint."""
    if head.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif head.startswith(ZSTD_MAGIC) or (len(head) >= 4 and head[0] & 0xF0 == 0x50
                                         and head[1:4] == b"\x2a\x4d\x18"):   # skippable frame
        kind = "zstd"
    else:
        for magic, name in UNSUPPORTED_MAGIC.items():
            if head.startswith(magic):
                raise InvalidArgument(f"layer is {name}-compressed; only gzip, zstd and plain tar are supported")
        kind = "tar"
    hinted = "gzip" if "gzip" in media_type else "zstd" if "zstd" in media_type else "tar" if media_type else ""
    if hinted and hinted != kind:
        log.info("layer media type %s says %s but its bytes are %s; reading it as %s",
                 media_type, hinted, kind, kind)
    return kind


class _ZstdFrames:
    """Follows the frame and block headers of a zstd stream as its bytes are read, so that a
    stream cut short is noticed: python-zstandard's stream reader ends quietly there."""

    def __init__(self, source: _Prefixed):
        self.source = source
        self.state, self.need, self.pending, self.skip = "magic", 4, b"", 0
        self.checksum = False

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self._feed(data)
        return data

    def complete(self) -> bool:
        return self.state == "magic" and not self.pending and not self.skip

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                take = min(self.skip, end - pos)
                self.skip -= take
                pos += take
                continue
            take = min(self.need - len(self.pending), end - pos)
            self.pending += data[pos:pos + take]
            pos += take
            if len(self.pending) == self.need:
                field, self.pending = self.pending, b""
                self._field(field)

    def _field(self, field: bytes) -> None:
        value = int.from_bytes(field, "little")
        if self.state == "magic":
            if value == 0xFD2FB528:
                self.state, self.need = "descriptor", 1
            elif value & 0xFFFFFFF0 == 0x184D2A50:
                self.state, self.need = "skippable", 4
            else:
                raise InvalidArgument("layer zstd stream is corrupt: bad frame magic")
        elif self.state == "skippable":
            self.skip, self.state, self.need = value, "magic", 4
        elif self.state == "descriptor":
            single = value >> 5 & 1
            self.checksum = bool(value >> 2 & 1)
            content_size = (single, 2, 4, 8)[value >> 6]
            self.skip = (1 - single) + (0, 1, 2, 4)[value & 3] + content_size
            self.state, self.need = "block", 3
        else:                                                   # a block header
            kind, size = value >> 1 & 3, value >> 3
            if kind == 3:
                raise InvalidArgument("layer zstd stream is corrupt: reserved block type")
            self.skip = 1 if kind == 1 else size
            if value & 1:                                       # the frame's last block
                self.skip += 4 if self.checksum else 0
                self.state, self.need = "magic", 4


class _Stream:
    """The decompressed layer: bounded, hashed as it passes, read by the tar parser.

    Decompression runs on a helper thread (zlib and zstd release the GIL), handing bounded chunks
    over a small queue, so it overlaps with hashing, parsing and the file writes. The thread
    is owned here: `close()` stops and joins it, and its exceptions surface in `read`."""

    def __init__(self, blob: BinaryIO, media_type: str = "", threaded: bool = True):
        head = b""
        while len(head) < 8 and (more := blob.read(8 - len(head))):
            head += more
        self.kind = sniff(head, media_type)
        self.source = _Prefixed(head, blob)
        self.hasher = hashlib.sha256()
        self.total = 0
        self.buf = b""
        self.view = memoryview(b"")
        self.pos = 0
        self.eof = False
        self._chunks = {"gzip": self._gunzip, "zstd": self._unzstd, "tar": self._plain}[self.kind]()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if threaded:
            self._queue = queue.Queue(QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._produce, name="berth-differ-inflate", daemon=True)
            self._thread.start()

    # producers: each yields decompressed chunks and keeps self.source.count honest

    def _plain(self) -> Iterator[bytes]:
        while chunk := self.source.read(OUT_CHUNK):
            yield chunk

    def _gunzip(self) -> Iterator[bytes]:
        d = inflate.decompressobj(16 + zlib.MAX_WBITS)
        pending = b""
        consumed = 0
        while True:
            if not pending:
                pending = self.source.read(IN_CHUNK)
                if not pending:
                    if not d.eof:
                        raise InvalidArgument("layer gzip stream is truncated")
                    return
            if d.eof:                                   # a further member (pigz, concatenation)
                while len(pending) < len(GZIP_MAGIC) and (more := self.source.read(IN_CHUNK)):
                    pending += more
                if not pending.startswith(GZIP_MAGIC):
                    raise InvalidArgument("layer has data after its gzip stream that is not gzip")
                d = inflate.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = d.decompress(pending, OUT_CHUNK)
            except inflate.error as e:
                raise InvalidArgument(f"layer gzip stream is corrupt: {e}") from None
            rest = d.unused_data if d.eof else d.unconsumed_tail
            consumed += len(pending) - len(rest)
            self.consumed = consumed
            pending = rest
            if out:
                yield out

    def _unzstd(self) -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        frames = _ZstdFrames(self.source)
        reader = dctx.stream_reader(frames, read_size=64 << 10, read_across_frames=True, closefd=False)
        try:
            while True:
                try:
                    out = reader.read(OUT_CHUNK)
                except zstandard.ZstdError as e:
                    raise InvalidArgument(f"layer zstd stream is corrupt: {e}") from None
                if not out:
                    break
                yield out
        finally:
            reader.close()
        if not frames.complete():
            raise InvalidArgument("layer zstd stream is truncated")

    consumed: int | None = None      # compressed bytes the gzip inflater has used, when it knows

    def _next_chunk(self) -> bytes | None:
        """Pull, bound and hash one decompressed chunk (on whichever thread runs the producer)."""
        chunk = next(self._chunks, None)
        if chunk is None:
            return None
        self.total += len(chunk)
        if self.total > MAX_TOTAL_SIZE:
            raise InvalidArgument(f"layer is larger than {MAX_TOTAL_SIZE} bytes uncompressed")
        if self.kind != "tar" and self.total > RATIO_GRACE:
            used = self.consumed if self.consumed is not None else self.source.count
            if self.total > MAX_RATIO * max(used, 1):
                raise InvalidArgument(
                    f"layer expands more than {MAX_RATIO}:1 ({used} compressed bytes gave {self.total}): "
                    "refusing a decompression bomb")
        return chunk

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._next_chunk()
                self._put(chunk)
                if chunk is None:
                    return
        except BaseException as e:   # handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _refill(self) -> bool:
        if self.eof:
            return False
        if self._queue is None:
            chunk = self._next_chunk()
        else:
            chunk = self._queue.get()
            if isinstance(chunk, BaseException):
                self.eof = True
                raise chunk
        if chunk is None:
            self.eof = True
            return False
        self.hasher.update(chunk)          # here, not on the inflating thread: the two overlap
        self.buf, self.view, self.pos = chunk, memoryview(chunk), 0
        return True

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
            self._thread.join()
            self._thread = None

    # consumers: the tar parser

    def read(self, n: int) -> bytes:
        """Exactly `n` bytes, or fewer only at the end of the stream."""
        end = self.pos + n
        if end <= len(self.buf):
            data = self.buf[self.pos:end]
            self.pos = end
            return data
        parts = [self.buf[self.pos:]]
        have = len(parts[0])
        self.pos = len(self.buf)
        while have < n and self._refill():
            take = min(n - have, len(self.buf))
            parts.append(self.buf[:take])
            self.pos = take
            have += take
        return b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise InvalidArgument(f"layer ends in the middle of {what}")
        return data

    def skip(self, n: int, what: str) -> None:
        while n:
            if self.pos >= len(self.buf) and not self._refill():
                raise InvalidArgument(f"layer ends in the middle of {what}")
            take = min(n, len(self.buf) - self.pos)
            self.pos += take
            n -= take

    def copy_to(self, fd: int, n: int, what: str) -> None:
        write = os.write
        while n:
            if self.pos >= len(self.buf) and not self._refill():
                raise InvalidArgument(f"layer ends in the middle of {what}")
            take = min(n, len(self.buf) - self.pos)
            view = self.view[self.pos:self.pos + take]
            while view:
                view = view[write(fd, view):]
            self.pos += take
            n -= take

    def drain(self) -> None:
        """Hash whatever follows the end-of-archive blocks: the diff_id covers the whole stream."""
        self.pos = len(self.buf)
        while self._refill():
            self.pos = len(self.buf)


# --- tar headers ------------------------------------------------------------------------------------

class Entry:
    """One tar member, with PAX and GNU extensions folded in."""
    __slots__ = ("raw", "name", "type", "mode", "uid", "gid", "size", "mtime_ns", "atime_ns",
                 "linkname", "devmajor", "devminor", "xattrs")

    def describe(self) -> str:
        return _show(self.raw)


def _numeric(field: bytes, what: str, raw: bytes) -> int:
    """A header number: octal text, or GNU base-256 when the top bit of the first byte is set."""
    if field and field[0] & 0x80:
        if field[0] & 0x40:                          # 0xff...: a negative two's complement number
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(field, "big") - (0x80 << (8 * (len(field) - 1)))
    text = field.strip(b" \0")
    if b"\0" in text:
        text = text.split(b"\0", 1)[0].rstrip(b" ")
    if not text:
        return 0
    if text.isdigit():                               # no sign, prefix, underscore or space inside
        try:
            return int(text, 8)
        except ValueError:
            pass
    raise InvalidArgument(f"layer entry {_show(raw)} has a malformed {what} field")


def _decimal(value: bytes, what: str, raw: bytes) -> int:
    if not value.isdigit() or len(value) > 20:
        raise InvalidArgument(f"layer entry {_show(raw)} has a malformed PAX {what} record")
    return int(value)


def _pax_time_ns(value: bytes, raw: bytes) -> int:
    """A PAX time: optional '-', seconds, optional fraction; kept to the nanosecond."""
    sign = -1 if value.startswith(b"-") else 1
    body = value[1:] if sign < 0 else value
    secs, _, frac = body.partition(b".")
    if not secs.isdigit() or (frac and not frac.isdigit()) or len(secs) > 12:
        raise InvalidArgument(f"layer entry {_show(raw)} has a malformed PAX time {value[:40]!r}")
    ns = int(secs) * 1_000_000_000 + int((frac[:9] or b"0").ljust(9, b"0"))
    return sign * ns


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records, "<len> <key>=<value>\\n" each; later records win."""
    records: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if not data[pos:].strip(b"\0"):            # NUL padding after the last record
            break
        sp = data.find(b" ", pos, pos + 21)
        if sp <= pos or not data[pos:sp].isdigit():
            raise InvalidArgument("layer has a malformed PAX header")
        length = int(data[pos:sp])
        stop = pos + length
        if length <= sp - pos + 1 or stop > end or data[stop - 1] != 0x0A:
            raise InvalidArgument("layer has a malformed PAX record")
        key, eq, value = data[sp + 1:stop - 1].partition(b"=")
        if not eq or not key or b"\0" in key:
            raise InvalidArgument("layer has a malformed PAX record key")
        records[key] = value
        pos = stop
    return records


class TarReader:
    """Streaming tar parser over a `_Stream`; each entry's data must be consumed (or is skipped)
    before the next header is read."""

    def __init__(self, stream: _Stream):
        self.stream = stream
        self.remaining = 0          # data bytes of the current entry not yet consumed
        self.padding = 0
        self.entries = 0

    def _meta(self, size: int, kind: str, raw: bytes) -> bytes:
        if size > MAX_META_SIZE:
            raise InvalidArgument(f"layer {kind} header before {_show(raw)} declares {size} bytes "
                                  f"(more than {MAX_META_SIZE})")
        data = self.stream.read_exact(size, f"a {kind} header")
        self.stream.skip(-size % BLOCK, f"a {kind} header")
        return data

    def finish_entry(self, what: str = "an entry") -> None:
        if self.remaining or self.padding:
            self.stream.skip(self.remaining + self.padding, what)
            self.remaining = self.padding = 0

    def next(self) -> Entry | None:
        self.finish_entry()
        stream = self.stream
        pax: dict[bytes, bytes] | None = None
        longname = longlink = None
        chain = 0
        while True:
            block = stream.read(BLOCK)
            if not block:
                return None                            # end of stream without end-of-archive blocks
            if len(block) != BLOCK:
                raise InvalidArgument("layer ends in the middle of a tar header")
            if block == ZERO_BLOCK:
                second = stream.read(BLOCK)
                if second and second != ZERO_BLOCK:
                    raise InvalidArgument("layer has a zero block followed by a non-zero block")
                return None
            raw_name = block[0:100].split(b"\0", 1)[0]
            want = _numeric(block[148:156], "checksum", raw_name)
            unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
            if want != unsigned:
                signed = unsigned - 256 * sum(1 for b in block if b & 0x80) \
                    + 256 * sum(1 for b in block[148:156] if b & 0x80)
                if want != signed:
                    raise InvalidArgument(f"layer tar header {_show(raw_name)} has a bad checksum")
            typeflag = block[156:157]
            size = _numeric(block[124:136], "size", raw_name)
            if size < 0:
                raise InvalidArgument(f"layer entry {_show(raw_name)} has a negative size")
            if typeflag in (PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                chain += 1
                if chain > MAX_META_CHAIN:
                    raise InvalidArgument(f"layer has more than {MAX_META_CHAIN} extension headers in a row")
                if typeflag == PAX_LOCAL:
                    pax = parse_pax(self._meta(size, "PAX", raw_name))
                elif typeflag == PAX_GLOBAL:
                    self._meta(size, "PAX global", raw_name)     # bounded, then ignored as Go does
                elif typeflag == GNU_LONGNAME:
                    longname = self._meta(size, "GNU long name", raw_name).split(b"\0", 1)[0]
                else:
                    longlink = self._meta(size, "GNU long link", raw_name).split(b"\0", 1)[0]
                continue
            break

        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise InvalidArgument(f"layer has more than {MAX_ENTRIES} entries")
        magic = block[257:265]
        ustar = magic == b"ustar\x0000"
        name = raw_name
        if ustar and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + raw_name
        linkname = block[157:257].split(b"\0", 1)[0]
        e = Entry()
        e.xattrs = None
        e.atime_ns = None
        e.mtime_ns = _numeric(block[136:148], "mtime", name) * 1_000_000_000
        e.uid = _numeric(block[108:116], "uid", name)
        e.gid = _numeric(block[116:124], "gid", name)
        if pax:
            if any(k.startswith(b"GNU.sparse.") for k in pax):
                raise InvalidArgument(f"layer entry {_show(name)} is a sparse file, which is not supported")
            for key, value in pax.items():
                if not value:
                    continue                           # an empty record unsets: keep the header's
                if key == b"path":
                    name = value
                elif key == b"linkpath":
                    linkname = value
                elif key == b"size":
                    size = _decimal(value, "size", name)
                elif key == b"uid":
                    e.uid = _decimal(value, "uid", name)
                elif key == b"gid":
                    e.gid = _decimal(value, "gid", name)
                elif key == b"mtime":
                    e.mtime_ns = _pax_time_ns(value, name)
                elif key == b"atime":
                    e.atime_ns = _pax_time_ns(value, name)
                elif key.startswith(XATTR_PAX_PREFIX):
                    if e.xattrs is None:
                        e.xattrs = {}
                    e.xattrs[key[len(XATTR_PAX_PREFIX):]] = value
        if longname is not None:
            name = longname
        if longlink is not None:
            linkname = longlink
        e.raw = name
        if typeflag == GNU_SPARSE:
            raise InvalidArgument(f"layer entry {_show(name)} is a GNU sparse file, which is not supported")
        if typeflag == AREG and name.endswith(b"/"):
            typeflag = DIR                              # pre-POSIX tars mark directories this way
        if typeflag not in KNOWN_TYPES:
            raise InvalidArgument(f"layer entry {_show(name)} has unsupported type {typeflag!r}")
        if size > MAX_ENTRY_SIZE:
            raise InvalidArgument(f"layer entry {_show(name)} declares {size} bytes, "
                                  f"more than the {MAX_ENTRY_SIZE} allowed")
        if not (0 <= e.uid <= MAX_ID and 0 <= e.gid <= MAX_ID):
            raise InvalidArgument(f"layer entry {_show(name)} has owner {e.uid}:{e.gid} out of range")
        e.type = REG if typeflag in (AREG, CONT) else typeflag
        e.name = clean_name(name)
        e.mode = _numeric(block[100:108], "mode", name) & 0o7777
        e.size = 0 if typeflag in HEADER_ONLY else size
        e.linkname = linkname
        e.devmajor = e.devminor = 0
        if typeflag in (CHR, BLK):
            e.devmajor = _numeric(block[329:337], "devmajor", name)
            e.devminor = _numeric(block[337:345], "devminor", name)
            if not (0 <= e.devmajor <= MAX_DEVICE and 0 <= e.devminor <= MAX_DEVICE):
                raise InvalidArgument(f"layer entry {_show(name)} has device number "
                                      f"{e.devmajor}:{e.devminor} beyond 32 bits")
        self.remaining = e.size
        self.padding = -e.size % BLOCK
        return e

    def copy_data(self, fd: int, e: Entry) -> None:
        self.stream.copy_to(fd, self.remaining, f"the data of {e.describe()}")
        self.remaining = 0


# --- the applier ------------------------------------------------------------------------------------

def _is_whiteout_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Lowers:
    """The read-only lower layers of an overlay apply, top first, looked up the way overlayfs
    merges them (whiteouts hide, opaque directories and non-directories stop the search). Only
    real directories are descended; a symlink on the way ends the lookup."""

    def __init__(self, dirs: list[str]):
        self.fds = [os.open(d, O_DIR_PATH) for d in dirs]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def find(self, rel: bytes) -> tuple[int, bytes, os.stat_result] | None:
        """(parent dir fd, base, lstat) of the topmost visible `rel`; the caller closes the fd."""
        if not self.fds or not rel:
            return None
        layers: list[int] = []
        for fd in self.fds:                            # an opaque root hides the layers below it
            layers.append(fd)
            if self._opaque(fd):
                break
        comps = rel.split(b"/")
        owned: list[int] = []
        try:
            for depth, comp in enumerate(comps):
                last = depth == len(comps) - 1
                deeper: list[int] = []
                for dfd in layers:
                    try:
                        st = os.stat(comp, dir_fd=dfd, follow_symlinks=False)
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    if _is_whiteout_device(st):
                        break                          # deleted here: hidden in every layer below
                    if last:
                        return os.dup(dfd), comp, st
                    if not stat.S_ISDIR(st.st_mode):
                        break                          # a non-directory hides what is below
                    cfd = os.open(comp, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=dfd)
                    owned.append(cfd)
                    deeper.append(cfd)
                    if self._opaque(cfd):
                        break
                layers = deeper
                if not layers:
                    return None
            return None
        finally:
            for fd in owned:
                os.close(fd)

    def root_names(self) -> set[bytes]:
        """Every name in the lowers' roots, visible or not."""
        return {os.fsencode(name) for fd in self.fds for name in os.listdir(_proc(fd))}

    @staticmethod
    def _opaque(dfd: int) -> bool:
        try:
            return os.getxattr(_proc(dfd), OVERLAY_OPAQUE) == b"y"
        except OSError:
            return False


class _Applier:
    def __init__(self, root: str, mode: str, lowers: list[str] | None):
        self.mode = mode
        self.overlay = mode == MODE_OVERLAY
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.lowers = _Lowers(lowers or [])
        self.cache: dict[bytes, int] = {}          # resolved parent directories, by name
        self.dead: list[int] = []                  # cached fds to close once no caller holds them
        self.dir_times: dict[tuple[int, int], tuple[bytes, int, int]] = {}   # (dev, ino) → times
        self.unpacked: set[tuple[int, int, bytes]] = set()   # native: (dev, dir ino, name) of ours
        self.borrowed: set[tuple[int, int, bytes]] = set()   # overlay: copies of lower entries
        self.opaque_done: set[tuple[int, int]] = set()
        self.count = 0

    def close(self) -> None:
        self.invalidate()
        self._sweep()
        self.lowers.close()
        os.close(self.rootfd)

    # resolution

    def invalidate(self) -> None:
        """Forget resolved directories: called whenever something is removed or replaced."""
        self.dead.extend(self.cache.values())
        self.cache.clear()

    def _sweep(self) -> None:
        for fd in self.dead:
            os.close(fd)
        self.dead.clear()

    def dir(self, rel: bytes, create: bool) -> int:
        """An O_PATH descriptor of directory `rel` inside the root (symlinks followed, confined to
        the root); with `create`, missing directories are made (with a lower layer's attributes in
        overlay mode, as containerd's mkparent does)."""
        fd = self.cache.get(rel)
        if fd is not None:
            return fd
        try:
            fd = openat2(self.rootfd, rel or b".", O_DIR_PATH)
        except OSError as e:
            if e.errno != errno.ENOENT or not create or not rel:
                raise
            parent, _, base = rel.rpartition(b"/")
            pfd = self.dir(parent, create)
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                raise InvalidArgument(f"layer path {_show(rel)} goes through a symlink to a missing "
                                      "directory") from None
            copied = self._implicit_dir_attrs(pfd, base, rel)
            self._mark(pfd, base, ours=not copied)          # native: made for this layer's entries
            fd = openat2(pfd, base, O_DIR_PATH | os.O_NOFOLLOW)
        if len(self.cache) >= 1024:
            self.invalidate()
        self.cache[rel] = fd
        return fd

    def _implicit_dir_attrs(self, pfd: int, base: bytes, rel: bytes) -> bool:
        """True when the directory copies a lower one."""
        found = self.lowers.find(rel) if self.overlay else None
        if found is None or not stat.S_ISDIR(found[2].st_mode):
            if found:
                os.close(found[0])
            self._chmod_dir(pfd, base, 0o755)
            return False
        lfd, lbase, st = found
        try:
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                os.fchown(dfd, st.st_uid, st.st_gid)
                for key, value in _read_xattrs(_proc(lfd, lbase)).items():
                    if not key.startswith(b"trusted."):
                        self._setxattr(dfd, None, key, value, stat.S_IFDIR)
                os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                dst = os.fstat(dfd)
                self.dir_times[(dst.st_dev, dst.st_ino)] = (rel, st.st_atime_ns, st.st_mtime_ns)
            finally:
                os.close(dfd)
        finally:
            os.close(lfd)
        return True

    @staticmethod
    def _chmod_dir(pfd: int, base: bytes, mode: int) -> None:
        dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.fchmod(dfd, mode)
        finally:
            os.close(dfd)

    # the main loop

    def apply(self, reader: TarReader) -> None:
        while True:
            self._sweep()
            e = reader.next()
            if e is None:
                return
            try:
                skipped = self._entry(reader, e) is False
            except BerthError as err:
                if e.describe() in err.message:
                    raise
                raise type(err)(f"layer entry {e.describe()}: {err.message}") from err
            except (ValueError, OverflowError) as err:
                raise InvalidArgument(f"layer entry {e.describe()}: {err}") from err
            except OSError as err:
                cls = ResourceExhausted if err.errno in (errno.ENOSPC, errno.EDQUOT) else InvalidArgument
                raise cls(f"layer entry {e.describe()}: {err.strerror or err}") from err
            if not skipped:
                self.count += 1

    def _entry(self, reader: TarReader, e: Entry) -> bool | None:
        """Apply one entry; False when it is deliberately ignored (the root, AUFS metadata)."""
        name = e.name
        parent, _, base = name.rpartition(b"/")
        if base.startswith(WHITEOUT_PREFIX):
            return self._whiteout(e, parent, base)
        if not name:
            if e.type == DIR:
                return False                             # "./": the root is the snapshotter's
            raise InvalidArgument(f"layer entry {e.describe()} would replace the root directory")

        if e.type == LNK:
            target = clean_name(e.linkname, "hardlink target")
            if not target:
                raise InvalidArgument(f"layer hardlink {e.describe()} points at the root directory")
        pfd = self.dir(parent, create=True)
        t = e.type
        if t == REG:
            fd = self._create(pfd, base, e, lambda: os.open(
                base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd))
            try:
                reader.copy_data(fd, e)
                os.fchown(fd, e.uid, e.gid)
                if e.xattrs:
                    self._xattrs(fd, None, e, stat.S_IFREG)
                os.fchmod(fd, e.mode)
                os.utime(fd, ns=self._times(e))
            finally:
                os.close(fd)
        elif t == DIR:
            self._create(pfd, base, e, lambda: os.mkdir(base, 0o700, dir_fd=pfd))
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                os.fchown(dfd, e.uid, e.gid)
                if e.xattrs:
                    self._xattrs(dfd, None, e, stat.S_IFDIR)
                os.fchmod(dfd, e.mode)
                st = os.fstat(dfd)
                self.dir_times[(st.st_dev, st.st_ino)] = ((parent + b"/" + base) if parent else base,
                                                          *self._times(e))
            finally:
                os.close(dfd)
        else:
            if t == SYM:
                if not e.linkname or len(e.linkname) > MAX_NAME or b"\0" in e.linkname:
                    raise InvalidArgument(f"layer symlink {e.describe()} has an invalid target")
                self._create(pfd, base, e, lambda: os.symlink(e.linkname, base, dir_fd=pfd))
            elif t == LNK:
                tparent, _, tbase = target.rpartition(b"/")
                self._create(pfd, base, e, lambda: self._link(tparent, tbase, target, pfd, base, e))
            else:
                kind = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[t]
                dev = os.makedev(e.devmajor, e.devminor) if t != FIFO else 0
                self._create(pfd, base, e, lambda: os.mknod(base, kind | 0o600, dev, dir_fd=pfd))
            self._meta_by_name(pfd, base, e)
        self._mark(pfd, base, ours=True)

    def _create(self, pfd: int, base: bytes, e: Entry, make) -> int | None:
        """Run `make`; if the name is taken, merge (directory onto directory) or replace it."""
        try:
            return make()
        except FileExistsError:
            pass
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if e.type == DIR and stat.S_ISDIR(st.st_mode):
            return None                                     # merge: only the metadata changes
        self._remove(pfd, base, st)
        result = make()
        if self.overlay and e.type == DIR and _is_whiteout_device(st):
            # this layer whited the name out and then made a directory there: the lower
            # directory's contents must stay hidden
            os.setxattr(_proc(pfd, base), OVERLAY_OPAQUE, b"y", follow_symlinks=False)
        return result

    def _remove(self, pfd: int, base: bytes, st: os.stat_result) -> None:
        self.invalidate()
        if stat.S_ISDIR(st.st_mode):
            def fail(func, path, exc_info):
                raise exc_info[1]
            shutil.rmtree(os.fsdecode(base), dir_fd=pfd, onerror=fail)
        else:
            os.unlink(base, dir_fd=pfd)

    def _link(self, tparent: bytes, tbase: bytes, target: bytes, pfd: int, base: bytes, e: Entry) -> None:
        try:
            tpfd = self.dir(tparent, create=False)
            if self.overlay and _is_whiteout_device(os.stat(tbase, dir_fd=tpfd, follow_symlinks=False)):
                raise FileNotFoundError(errno.ENOENT, "whited out by this layer")
            os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            return
        except (FileNotFoundError, NotADirectoryError):
            if not self.overlay or not self._copy_up(target):
                raise InvalidArgument(f"layer hardlink {e.describe()} points at {_show(e.linkname)}, "
                                      "which is not in the layer or below it") from None
        tpfd = self.dir(tparent, create=False)
        os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _copy_up(self, rel: bytes) -> bool:
        """Copy `rel` from the lowers into the upper, as overlayfs would before linking to it;
        not what this layer has already hidden."""
        if self._shadowed(rel):
            return False
        found = self.lowers.find(rel)
        if found is None:
            return False
        lfd, lbase, st = found
        try:
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"layer hardlink points at directory {_show(rel)}")
            parent, _, base = rel.rpartition(b"/")
            pfd = self.dir(parent, create=True)
            if stat.S_ISREG(st.st_mode):
                src = os.open(lbase, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lfd)
                try:
                    dst = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  0o600, dir_fd=pfd)
                    try:
                        while chunk := os.read(src, COPY_CHUNK):
                            view = memoryview(chunk)
                            while view:
                                view = view[os.write(dst, view):]
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(lbase, dir_fd=lfd), base, dir_fd=pfd)
            else:
                os.mknod(base, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=pfd)
            copied = Entry()
            copied.raw, copied.name = rel, rel
            copied.type = LNK if stat.S_ISLNK(st.st_mode) else REG
            copied.uid, copied.gid, copied.mode = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
            copied.atime_ns, copied.mtime_ns = st.st_atime_ns, st.st_mtime_ns
            copied.xattrs = {k: v for k, v in _read_xattrs(_proc(lfd, lbase)).items()
                             if not k.startswith(b"trusted.")} or None
            self._meta_by_name(pfd, base, copied)
            self._mark(pfd, base, ours=False)
            return True
        finally:
            os.close(lfd)

    # metadata

    @staticmethod
    def _times(e: Entry) -> tuple[int, int]:
        atime = e.atime_ns if e.atime_ns is not None and e.atime_ns > e.mtime_ns else e.mtime_ns
        bound = 1 << 62                                   # keep within a 64-bit timespec
        return max(-bound, min(bound, atime)), max(-bound, min(bound, e.mtime_ns))

    def _meta_by_name(self, pfd: int, base: bytes, e: Entry) -> None:
        """Owner, xattrs, mode and times of a non-regular, non-directory entry (symlink, hardlink,
        device, FIFO), none of them following a symlink: lchown, lsetxattr through the parent's
        descriptor, chmod through an O_PATH descriptor of a non-symlink, utimensat NOFOLLOW."""
        os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if e.xattrs:
                self._xattrs(None, _proc(pfd, base), e, stat.S_IFMT(st.st_mode))
            if not stat.S_ISLNK(st.st_mode):             # Linux symlinks have no mode of their own
                os.chmod(_proc(fd), e.mode)
        finally:
            os.close(fd)
        os.utime(base, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)

    def _xattrs(self, fd: int | None, path: bytes | None, e: Entry, kind: int) -> None:
        for key, value in e.xattrs.items():
            if key.startswith(b"trusted."):
                # containerd refuses admin attributes from an archive; in overlay mode they would
                # also steer overlayfs itself (opaque, redirect, metacopy)
                log.debug("layer entry %s: ignoring xattr %r", e.describe(), key)
                continue
            self._setxattr(fd, path, key, value, kind, e)

    @staticmethod
    def _setxattr(fd: int | None, path: bytes | None, key: bytes, value: bytes, kind: int,
                  e: Entry | None = None) -> None:
        try:
            if fd is not None:
                os.setxattr(fd, key, value)
            else:
                os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or (
                    err.errno == errno.EPERM and key.startswith(b"user.")
                    and kind not in (stat.S_IFREG, stat.S_IFDIR)):
                # containerd's rule: unsupported attributes, and user.* where Linux allows them
                # only on files and directories, are skipped
                log.warning("layer entry %s: ignoring xattr %r: %s",
                            e.describe() if e else "?", key, err.strerror)
                return
            raise

    def _key(self, pfd: int, base: bytes) -> tuple[int, int, bytes]:
        st = os.fstat(pfd)
        return st.st_dev, st.st_ino, base

    def _mark(self, pfd: int, base: bytes, ours: bool) -> None:
        """Record whose a name is. A whiteout or an opaque marker hides only what the layers
        below put there: natively what this layer did not unpack, in overlay mode the copies
        of lower entries it had to make (the parents and targets of hardlinks to lower files)."""
        key = self._key(pfd, base)
        if not self.overlay:
            if ours:
                self.unpacked.add(key)
        elif ours:
            self.borrowed.discard(key)
        else:
            self.borrowed.add(key)

    def _ours(self, key: tuple[int, int, bytes]) -> bool:
        return key not in self.borrowed if self.overlay else key in self.unpacked

    # whiteouts

    def _whiteout(self, e: Entry, parent: bytes, base: bytes) -> bool | None:
        if base == WHITEOUT_OPAQUE:
            pfd = self.dir(parent, create=True)
            self._clear_opaque(pfd)
            if self.overlay:
                os.setxattr(_proc(pfd), OVERLAY_OPAQUE, b"y")
                if not parent:
                    # overlayfs ignores the attribute on a layer's root: hide what the lowers
                    # show there one name at a time
                    for name in sorted(self.lowers.root_names()):
                        self._overlay_whiteout(e, pfd, b"", name)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("layer entry %s: ignoring AUFS metadata", e.describe())
            return False
        target = base[len(WHITEOUT_PREFIX):]
        if target in (b"", b".", b".."):
            raise InvalidArgument(f"layer whiteout {e.describe()} names no file of its directory")
        if self.overlay:
            self._overlay_whiteout(e, self.dir(parent, create=True), parent, target)
            return
        try:
            pfd = self.dir(parent, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return                                           # nothing there to delete
        try:
            st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if self._ours(self._key(pfd, target)):
            if stat.S_ISDIR(st.st_mode):
                self._clear_opaque_at(pfd, target)
            return
        self._remove(pfd, target, st)

    def _overlay_whiteout(self, e: Entry, pfd: int, parent: bytes, target: bytes) -> None:
        """Anything already in the upper is this layer's own, which a whiteout of the same layer
        does not hide (OCI); a directory of ours stops showing the lower one. A whiteout is
        written only where it hides something: overlayfs lists a directory that no lower one
        merges with as it is on disk, where a whiteout would show as a name that cannot be
        opened (containers/fuse-overlayfs#306)."""
        try:
            st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not self._ours(self._key(pfd, target)):
            self._remove(pfd, target, st)               # a copy of what is below: hidden with it
            st = None
        if st is None:
            if self._hides_something(parent + b"/" + target if parent else target):
                os.mknod(target, stat.S_IFCHR, 0, dir_fd=pfd)
                os.chown(target, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        elif stat.S_ISDIR(st.st_mode):
            self._clear_opaque_at(pfd, target)
            os.setxattr(_proc(pfd, target), OVERLAY_OPAQUE, b"y", follow_symlinks=False)

    def _hides_something(self, rel: bytes) -> bool:
        """Overlay: whether a whiteout at `rel` would hide anything in the lowers."""
        shadowed = self._shadowed(rel)
        if shadowed is None:
            return True                                  # a symlink on the way: keep it to be safe
        if shadowed:
            return False
        found = self.lowers.find(rel)
        if found is None:
            return False
        os.close(found[0])
        return True

    def _shadowed(self, rel: bytes) -> bool | None:
        """Overlay: whether this layer already hides the lowers at `rel`: an opaque directory or a
        whiteout on the way, or a whiteout at `rel` itself. None where the way goes through a
        symlink of this layer's, whose lower counterpart is not what the path names."""
        comps = rel.split(b"/")
        owned: list[int] = []
        dfd = self.rootfd
        try:
            for depth, comp in enumerate(comps):
                if depth and _Lowers._opaque(dfd):       # the root's attribute counts for nothing
                    return True
                try:
                    st = os.stat(comp, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if _is_whiteout_device(st):
                    return True
                if depth == len(comps) - 1:
                    return False
                if stat.S_ISLNK(st.st_mode):
                    return None
                if not stat.S_ISDIR(st.st_mode):
                    return True
                dfd = os.open(comp, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=dfd)
                owned.append(dfd)
            return False
        finally:
            for fd in owned:
                os.close(fd)

    def _clear_opaque_at(self, pfd: int, base: bytes) -> None:
        cfd = openat2(pfd, base, O_DIR_PATH | os.O_NOFOLLOW)
        try:
            self._clear_opaque(cfd)
        finally:
            os.close(cfd)

    def _clear_opaque(self, dfd: int) -> None:
        """Opaque directory: remove every child that this layer did not put there (in overlay
        mode, only copies of lower entries are in the upper and not this layer's)."""
        if self.overlay and not self.borrowed:
            return
        st = os.fstat(dfd)
        if (st.st_dev, st.st_ino) in self.opaque_done:
            return
        self.opaque_done.add((st.st_dev, st.st_ino))
        self.invalidate()
        self._clear_children(dfd, st)

    def _clear_children(self, dfd: int, st: os.stat_result) -> None:
        rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            names = [os.fsencode(n) for n in os.listdir(rfd)]
        finally:
            os.close(rfd)
        for name in names:
            cst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not self._ours((st.st_dev, st.st_ino, name)):
                self._remove(dfd, name, cst)
            elif stat.S_ISDIR(cst.st_mode):
                cfd = os.open(name, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    self._clear_children(cfd, os.fstat(cfd))
                finally:
                    os.close(cfd)

    def finish(self) -> None:
        """Directory times last: writing into a directory changes its mtime."""
        self.invalidate()
        for (dev, ino), (rel, atime, mtime) in self.dir_times.items():
            self._sweep()
            parent, _, base = rel.rpartition(b"/")
            try:
                pfd = self.dir(parent, create=False)
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
                    os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
            except OSError:
                continue                                    # replaced later in the layer


def apply_layer(blob: BinaryIO, root: str, *, mode: str, media_type: str = "",
                lowers: list[str] | None = None) -> dict:
    """Unpack the layer read from `blob` (gzip, zstd or plain tar, told apart by its bytes) onto
    the directory `root`.

    `mode="overlay"`: `root` is an empty overlayfs upper directory; `lowers` are the parent
    layers' directories, top first (for the attributes of implied parent directories and for
    hardlinks to files below). `mode="native"`: `root` is a copy of the parent tree.

    Returns `{"diff_id": "sha256:<hex of the uncompressed stream>", "size": <uncompressed bytes>,
    "files": <entries applied>}`. Raises InvalidArgument for a malformed or hostile layer (and
    ResourceExhausted when the disk is full); the caller then discards `root`."""
    if mode not in MODES:
        raise InvalidArgument(f"differ mode must be one of {', '.join(MODES)}, not {mode!r}")
    if lowers and mode != MODE_OVERLAY:
        raise InvalidArgument("lowers are only used in overlay mode")
    stream = _Stream(blob, media_type)
    try:
        applier = _Applier(root, mode, lowers)
        try:
            applier.apply(TarReader(stream))
            applier.finish()
        finally:
            applier.close()
        stream.drain()
    finally:
        stream.close()
    return {"diff_id": "sha256:" + stream.hasher.hexdigest(), "size": stream.total, "files": applier.count}


# --- the changeset writer ---------------------------------------------------------------------------

def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for key in keys:
        try:
            out[os.fsencode(key)] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    return out


def _layer_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """What a layer carries: not trusted.* (overlayfs' own, and refused by appliers) and not
    security.selinux (a label of this host's policy)."""
    return {k: v for k, v in xattrs.items()
            if not k.startswith(b"trusted.") and k != b"security.selinux"}


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes,
           linkname: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytearray:
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    for lo, value in ((329, devmajor), (337, devminor)):
        h[lo:lo + 8] = _octal(value, 8) if value < 8 ** 7 else b"\x80" + value.to_bytes(7, "big")
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return h


class TarWriter:
    """Deterministic PAX tar: fields that do not fit the ustar header go to a PAX record, records
    sorted by key, no user or group names, whole-second mtimes (as containerd writes them)."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.hasher = hashlib.sha256()
        self.size = 0
        self.buf = bytearray()

    def _emit(self, data) -> None:
        self.buf += data
        if len(self.buf) >= COPY_CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.hasher.update(self.buf)
            self.out.write(self.buf)
            self.size += len(self.buf)
            self.buf = bytearray()

    def header(self, name: bytes, *, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
               mtime: int = 0, typeflag: bytes = REG, linkname: bytes = b"", devmajor: int = 0,
               devminor: int = 0, xattrs: dict[bytes, bytes] | None = None) -> None:
        pax: dict[bytes, bytes] = {}
        if len(name) > 100:
            pax[b"path"] = name
            name = name[:100]
        if len(linkname) > 100:
            pax[b"linkpath"] = linkname
            linkname = linkname[:100]
        if size >= 8 ** 11:
            pax[b"size"] = b"%d" % size
            size = 0
        for key, value in ((b"uid", uid), (b"gid", gid)):
            if value >= 8 ** 7:
                pax[key] = b"%d" % value
        uid, gid = (uid if uid < 8 ** 7 else 0), (gid if gid < 8 ** 7 else 0)
        if not 0 <= mtime < 8 ** 11:
            pax[b"mtime"] = b"%d" % mtime
            mtime = 0
        for key, value in (xattrs or {}).items():
            pax[XATTR_PAX_PREFIX + key] = value
        if pax:
            data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
            base = posixpath.basename(name.rstrip(b"/"))
            self._emit(_ustar((b"PaxHeaders.0/" + base)[:100], 0o644, 0, 0, len(data), 0, PAX_LOCAL))
            self._emit(data + bytes(-len(data) % BLOCK))
        self._emit(_ustar(name, mode, uid, gid, size, mtime, typeflag, linkname, devmajor, devminor))

    def data_from(self, fd: int, size: int, what: str) -> None:
        left = size
        while left:
            chunk = os.read(fd, min(left, COPY_CHUNK))
            if not chunk:
                raise FailedPrecondition(f"{what} shrank while it was being written to the layer")
            self._emit(chunk)
            left -= len(chunk)
        self._emit(bytes(-size % BLOCK))

    def close(self) -> None:
        self._emit(bytes(2 * BLOCK))
        self.flush()


class _Node:
    """One path of the walk: its stat, layer xattrs, link target, and state for the writer."""
    __slots__ = ("rel", "st", "xattrs", "target", "whiteout", "opaque", "changed")


RESOLVE_WALKED = RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | 0x04 | 0x08    # NO_SYMLINKS | BENEATH


class _ChangeWalker:
    def __init__(self, writer: TarWriter, upperfd: int):
        self.w = writer
        self.upperfd = upperfd
        self.first_name: dict[tuple[int, int], bytes] = {}      # hardlinks: inode → archived name
        self.emitted_dirs: set[bytes] = set()

    # emission

    def emit(self, node: _Node, parents: list[_Node]) -> None:
        for p in parents:                               # include unchanged parents, as containerd does
            if p.rel not in self.emitted_dirs:
                self._write(p)
        self._write(node)

    def _write(self, n: _Node) -> None:
        if n.whiteout:
            parent, _, base = n.rel.rpartition(b"/")
            self.w.header((parent + b"/" if parent else b"") + WHITEOUT_PREFIX + base)
            return
        st = n.st
        common = dict(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime=st.st_mtime_ns // 1_000_000_000, xattrs=n.xattrs)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            self.emitted_dirs.add(n.rel)
            self.w.header(n.rel + b"/", typeflag=DIR, **common)
            if n.opaque:
                self.w.header(n.rel + b"/" + WHITEOUT_OPAQUE)
            return
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.first_name.get(key)
            if first is not None:
                self.w.header(n.rel, typeflag=LNK, linkname=first, **common)
                return
            self.first_name[key] = n.rel
        if fmt == stat.S_IFREG:
            # reopened by its path below the upper directory, which the walk found to be made of
            # real directories only; a symlink put there since is refused, not followed
            fd = openat2(self.upperfd, n.rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, RESOLVE_WALKED)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise FailedPrecondition(f"{_show(n.rel)} changed while the layer was being written")
                self.w.header(n.rel, typeflag=REG, size=st.st_size, **common)
                self.w.data_from(fd, st.st_size, _show(n.rel))
            finally:
                os.close(fd)
        elif fmt == stat.S_IFLNK:
            self.w.header(n.rel, typeflag=SYM, linkname=n.target, **common)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            self.w.header(n.rel, typeflag=CHR if fmt == stat.S_IFCHR else BLK,
                          devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev), **common)
        elif fmt == stat.S_IFIFO:
            self.w.header(n.rel, typeflag=FIFO, **common)

    # reading the trees

    @staticmethod
    def node(dfd: int, name: bytes, rel: bytes) -> tuple[_Node, dict[bytes, bytes]] | None:
        """The node for `name` in directory `dfd`, and all its xattrs (before filtering)."""
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISSOCK(st.st_mode):
            return None                                       # sockets are never archived
        n = _Node()
        n.rel, n.st = rel, st
        n.whiteout = n.opaque = n.changed = False
        n.target = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else b""
        xattrs = _read_xattrs(_proc(dfd, name))
        n.xattrs = _layer_xattrs(xattrs)
        return n, xattrs

    @staticmethod
    def listdir(dfd: int) -> list[bytes]:
        rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            return sorted(os.fsencode(n) for n in os.listdir(rfd))
        finally:
            os.close(rfd)

    # overlay: the upper directory is the change

    def overlay(self, dfd: int, rel: bytes, parents: list[_Node]) -> None:
        for name in self.listdir(dfd):
            path = rel + b"/" + name if rel else name
            got = self.node(dfd, name, path)
            if got is None:
                continue
            n, xattrs = got
            if _is_whiteout_device(n.st):
                n.whiteout = True
                self.emit(n, parents)
                continue
            for key in (b"trusted.overlay.metacopy", b"trusted.overlay.redirect"):
                if key in xattrs:
                    raise FailedPrecondition(f"{_show(path)} in the upper directory has {key.decode()}: "
                                             "mount without metacopy and redirect_dir to diff it")
            n.opaque = xattrs.get(OVERLAY_OPAQUE) == b"y"
            self.emit(n, parents)
            if stat.S_ISDIR(n.st.st_mode):
                cfd = os.open(name, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    self.overlay(cfd, path, parents + [n])
                finally:
                    os.close(cfd)

    # native: compare the new tree with its parent

    def native_scan(self, ufd: int, lfd: int | None, rel: bytes, out: list[_Node]) -> None:
        """Collect every node in archive order with its `changed` flag; emission comes after,
        once the hardlink groups with a changed member are known."""
        unames = self.listdir(ufd)
        lnames = self.listdir(lfd) if lfd is not None else []
        uset, lset = set(unames), set(lnames)
        for name in sorted(uset | lset):
            path = rel + b"/" + name if rel else name
            if name not in uset:
                n = _Node()
                n.rel, n.st, n.whiteout, n.opaque, n.changed = path, None, True, False, True
                out.append(n)
                continue
            got = self.node(ufd, name, path)
            if got is None:
                continue
            n = got[0]
            low = self.node(lfd, name, path) if name in lset else None
            low = low[0] if low else None
            n.changed = low is None or _differs(n, low, ufd, lfd, name)
            out.append(n)
            if stat.S_ISDIR(n.st.st_mode):
                cfd = os.open(name, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=ufd)
                clfd = None
                try:
                    if low is not None and stat.S_ISDIR(low.st.st_mode):
                        clfd = os.open(name, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=lfd)
                    self.native_scan(cfd, clfd, path, out)
                finally:
                    os.close(cfd)
                    if clfd is not None:
                        os.close(clfd)


def _differs(a: _Node, b: _Node, afd: int, bfd: int, name: bytes) -> bool:
    """continuity's comparison: type, mode, owner, xattrs, link target or device number, then
    size and mtime, and the bytes themselves when the mtime cannot tell (whole seconds)."""
    sa, sb = a.st, b.st
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid) or a.xattrs != b.xattrs:
        return True
    if stat.S_ISLNK(sa.st_mode):
        return a.target != b.target
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return sa.st_rdev != sb.st_rdev
    if sa.st_mtime_ns != sb.st_mtime_ns:
        return True
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size:
            return True
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
            return False
        if sa.st_mtime_ns % 1_000_000_000 == 0:
            # every file unpacked from a layer has a whole-second mtime, which does not tell a
            # rewrite within the same second apart: compare the bytes
            return not _same_content(afd, bfd, name)
    return False


def _same_content(afd: int, bfd: int, name: bytes) -> bool:
    fa = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=afd)
    try:
        fb = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=bfd)
        try:
            while True:
                ca, cb = os.read(fa, COPY_CHUNK), os.read(fb, COPY_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def write_changes(lower: list[str] | None, upper: str, out: BinaryIO, *, mode: str) -> dict:
    """Write to `out` an uncompressed tar changeset (the caller compresses it) of what `upper`
    changes relative to `lower`, and return `{"diff_id": "sha256:…", "size": <bytes written>}`.

    `mode="overlay"`: `upper` is an overlayfs upper directory (unmounted or quiescent); its
    whiteout devices and opaque directories become `.wh.` entries; `lower` is not read.
    `mode="native"`: `lower` is `[parent tree]` (or None/[] for a base layer) and `upper` the
    complete new tree; added and changed paths are archived, removed ones whited out.

    The output is deterministic: entries in path order with parents first (the unchanged parents
    of a change included), PAX format, hardlinks within the changeset as link entries, whole-second
    mtimes, xattrs except trusted.* and security.selinux."""
    if mode not in MODES:
        raise InvalidArgument(f"differ mode must be one of {', '.join(MODES)}, not {mode!r}")
    lowers = list(lower or [])
    if mode == MODE_NATIVE and len(lowers) > 1:
        raise InvalidArgument("native mode diffs against one parent tree")
    w = TarWriter(out)
    ufd = os.open(upper, O_DIR_PATH)
    try:
        walker = _ChangeWalker(w, ufd)
        if mode == MODE_OVERLAY:
            walker.overlay(ufd, b"", [])
        else:
            lfd = os.open(lowers[0], O_DIR_PATH) if lowers else None
            try:
                nodes: list[_Node] = []
                walker.native_scan(ufd, lfd, b"", nodes)
            finally:
                if lfd is not None:
                    os.close(lfd)
            _emit_native(walker, nodes)
        w.close()
    finally:
        os.close(ufd)
    return {"diff_id": "sha256:" + w.hasher.hexdigest(), "size": w.size}


def _emit_native(walker: _ChangeWalker, nodes: list[_Node]) -> None:
    # a hardlink group with one changed name is archived whole, so that applying the changeset
    # leaves all its names on one inode
    groups = {(n.st.st_dev, n.st.st_ino) for n in nodes
              if n.changed and not n.whiteout and n.st.st_nlink > 1 and not stat.S_ISDIR(n.st.st_mode)}
    dirs: dict[bytes, _Node] = {}
    for n in nodes:
        if not n.whiteout and stat.S_ISDIR(n.st.st_mode):
            dirs[n.rel] = n
        linked = (not n.whiteout and n.st.st_nlink > 1 and (n.st.st_dev, n.st.st_ino) in groups)
        if not (n.changed or linked):
            continue
        parents = []
        rel = n.rel
        while b"/" in rel:
            rel = rel.rpartition(b"/")[0]
            parents.append(dirs[rel])
        parents.reverse()
        walker.emit(n, parents)
