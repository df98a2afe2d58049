"""ZMTP 3.0 (ZeroMQ RFC 23), the DEALER end of one connection, without libzmq.

`berth` is a short-lived command: importing pyzmq and starting libzmq's I/O and reaper threads
cost about half of the CPU a `berth run --rm` spends. A client needs little of ZeroMQ (one
connection to berthd's ROUTER, the NULL mechanism, multipart messages), so it speaks the wire
protocol itself over a unix or TCP stream socket; berthd keeps libzmq. I/O is blocking, bounded
by deadlines, with no threads.

Errors: `Hangup` (an Unavailable) when the peer closes or resets the connection; Unavailable
when it is not a ZMTP 3 ROUTER, DEALER or REP; InvalidArgument for a malformed frame and
ResourceExhausted for one beyond bus.codec's limits; DeadlineExceeded when it sends no greeting
or takes no message in time (a `recv` that times out returns None instead). After any of them
the Peer is closed: the byte stream cannot be trusted any further.
"""
from __future__ import annotations

import _socket            # not `socket`: its enum set-up alone costs a `berth` command milliseconds
import select
import struct
import time

from bus.codec import MAX_BULK_FRAME, MAX_FRAMES, MAX_HEADER
from bus.errors import BerthError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

MORE, LONG, COMMAND = 0x01, 0x02, 0x04          # frame flags; the other five bits must be 0
GREETING_SIZE = 64
MECHANISM = b"NULL".ljust(20, b"\0")
# signature (0xFF, padding, 0x7F: a ZMTP 1.0 peer reads an empty identity), version 3.0,
# mechanism, as-server 0 and filler.
GREETING = b"\xff" + bytes(7) + b"\x01\x7f" + bytes((3, 0)) + MECHANISM + bytes(32)
PEER_TYPES = (b"ROUTER", b"DEALER", b"REP")       # what a DEALER may talk to (RFC 28)
MAX_COMMAND = 1 << 16          # READY and PING are a few dozen bytes; anything near this is hostile
READ_CHUNK = 1 << 16           # bytes asked of the kernel per read of headers and small frames


class Hangup(Unavailable):
    """The peer closed or reset the connection. Raised by `send`, it means the message was not
    written whole, so the peer never took it."""


# --- the pure part: greeting, commands, frame headers ---------------------------------------------

def check_greeting(data: bytes) -> None:
    """Refuse a greeting that is not ZMTP 3.x with the NULL mechanism, as soon as the bytes that
    show it have arrived (a peer that is no ZMTP peer at all may never send 64 bytes)."""
    if (data and data[0] != 0xFF) or (len(data) >= 10 and not data[9] & 0x01):
        raise Unavailable(f"does not speak ZMTP (it sent {bytes(data[:16])!r})")
    if len(data) >= 11 and data[10] < 3:
        raise Unavailable(f"speaks ZMTP 2.0 or older (revision {data[10]}), not 3")
    if len(data) >= 32 and data[12:32] != MECHANISM:
        name = bytes(data[12:32]).rstrip(b"\0").decode("ascii", "replace")
        raise Unavailable(f"asks for the {name!r} security mechanism; only NULL is supported")


def frame_header(size: int, flags: int = 0) -> bytes:
    if size < 256:
        return bytes((flags, size))
    return struct.pack("!BQ", flags | LONG, size)


def encode_message(frames: list[bytes]) -> list[bytes]:
    """What to write for one multipart message: each frame's header, then its bytes."""
    if not frames:
        raise InvalidArgument("a message has at least one frame")
    chunks = []
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        chunks.append(frame_header(len(frame), MORE if i < last else 0))
        chunks.append(frame)
    return chunks


def command(name: bytes, data: bytes = b"") -> bytes:
    """A whole command frame."""
    body = bytes((len(name),)) + name + data
    return frame_header(len(body), COMMAND) + body


def encode_properties(props: dict[bytes, bytes]) -> bytes:
    return b"".join(bytes((len(k),)) + k + struct.pack("!I", len(v)) + v for k, v in props.items())


READY = command(b"READY", encode_properties({b"Socket-Type": b"DEALER"}))


def parse_command(body: bytes) -> tuple[bytes, bytes]:
    """(name, data) of a command frame's body."""
    if not body or len(body) < 1 + body[0]:
        raise InvalidArgument("malformed ZMTP command: its name runs past the frame")
    return bytes(body[1:1 + body[0]]), bytes(body[1 + body[0]:])


def parse_properties(data: bytes) -> dict[str, bytes]:
    """READY's metadata, names lower-cased (they are case-insensitive)."""
    props, pos = {}, 0
    while pos < len(data):
        size = data[pos]
        name_end = pos + 1 + size
        if size == 0 or name_end + 4 > len(data):
            raise InvalidArgument("malformed ZMTP metadata: a property name runs past the command")
        value_size = struct.unpack_from("!I", data, name_end)[0]
        value_end = name_end + 4 + value_size
        if value_end > len(data):
            raise InvalidArgument("malformed ZMTP metadata: a property value runs past the command")
        props[bytes(data[pos + 1:name_end]).decode("ascii", "replace").lower()] = bytes(data[name_end + 4:value_end])
        pos = value_end
    return props


def size_length(flags: int) -> int:
    """How many bytes of size follow a frame's flags."""
    if flags & ~(MORE | LONG | COMMAND):
        raise InvalidArgument(f"malformed ZMTP frame: reserved flag bits set (0x{flags:02x})")
    if flags & COMMAND and flags & MORE:
        raise InvalidArgument("malformed ZMTP frame: a command with the MORE flag")
    return 8 if flags & LONG else 1


def check_frame(flags: int, size: int, index: int) -> None:
    """bus.codec's limits, applied to a frame's declared size before any of it is read: frame
    `index` of its message (0 is the envelope, the others raw bytes)."""
    if flags & COMMAND:
        if size > MAX_COMMAND:
            raise ResourceExhausted(f"ZMTP command of {size} bytes exceeds the limit of {MAX_COMMAND}")
        return
    if index >= MAX_FRAMES:
        raise ResourceExhausted(f"message of more than {MAX_FRAMES} frames exceeds the limit")
    limit = MAX_HEADER if index == 0 else MAX_BULK_FRAME
    if size > limit:
        raise ResourceExhausted(f"frame of {size} bytes exceeds the limit of {limit}")


# --- the connection ---------------------------------------------------------------------------------

def connect(address: str, name: str, timeout: float) -> Peer:
    """A Peer on `address` (`ipc://PATH`, `ipc://@NAME` for the abstract namespace, a bare socket
    path, or `tcp://HOST:PORT`), greetings exchanged. OSError if nothing accepts the connection;
    a bus.errors error if what does is no ZMTP 3 peer for a DEALER, or says nothing in time."""
    deadline = time.monotonic() + timeout
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"bad address {address!r}: tcp://HOST:PORT")
        import socket
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        path = address[len("ipc://"):] if address.startswith("ipc://") else address
        if "://" in path or not path:
            raise InvalidArgument(f"bad address {address!r}: ipc://PATH, tcp://HOST:PORT or a socket path")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect("\0" + path[1:] if path.startswith("@") else path)
        except BaseException:
            sock.close()
            raise
    peer = Peer(sock, name)
    peer.handshake(deadline)
    return peer


class _Late(Exception):
    """The deadline passed while waiting for the socket."""


class Peer:
    """One ZMTP 3.0 connection, DEALER end, over a connected stream socket. One owner at a time
    (no locking)."""

    def __init__(self, sock: _socket.socket, name: str):
        sock.setblocking(False)
        self.sock: _socket.socket | None = sock
        self.name = name                   # for messages, e.g. "berthd at /run/berth/berth.sock"
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.rbuf = bytearray()            # bytes read and not yet taken
        self.peer_type: bytes | None = None              # known once its READY is read
        self.midway = False                # part of a message taken: a deadline now breaks the stream

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def handshake(self, deadline: float) -> None:
        """Greetings and READY both ways. Our first message waits for the peer's READY: libzmq
        drops a peer whose message arrives before it has sent its own READY."""
        try:
            self._write([GREETING, READY], deadline)
            while len(self.rbuf) < GREETING_SIZE:
                check_greeting(self.rbuf)
                self._read(deadline)
            check_greeting(self.rbuf[:GREETING_SIZE])
            del self.rbuf[:GREETING_SIZE]
            flags, body = self._frame(deadline, 0)
            name, data = parse_command(body) if flags & COMMAND else (b"", b"")
            if name == b"ERROR":
                raise Unavailable(f"refused the connection: {_error_reason(data)}")
            if name != b"READY":
                raise Unavailable("did not start with a READY command")
            peer_type = parse_properties(data).get("socket-type", b"")
            if peer_type not in PEER_TYPES:
                raise Unavailable(f"is a {peer_type.decode('ascii', 'replace') or 'untyped'} socket; "
                                  "a DEALER talks to a ROUTER, DEALER or REP")
            self.peer_type = peer_type
            self.midway = False
        except _Late:
            raise self._broken(DeadlineExceeded("sent no ZMTP greeting in time")) from None
        except BerthError as e:
            raise self._broken(e) from None

    def gone(self) -> bool:
        """Whether this connection is closed or the peer has hung up, looked at without blocking
        (what the peer sent meanwhile is kept)."""
        if self.sock is None:
            return True
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return True
        self.rbuf += data
        return False

    def send(self, frames: list[bytes], deadline: float) -> None:
        """Write one multipart message. Hangup if the peer hung up first; DeadlineExceeded if it
        would not take it all by the deadline (either way it never got the whole message)."""
        try:
            self._write(encode_message(frames), deadline)
        except BerthError as e:
            raise self._broken(e) from None

    def recv(self, deadline: float) -> list[bytes] | None:
        """The next message's frames; None if none came whole by the deadline."""
        frames: list[bytes] = []
        try:
            while True:
                flags, payload = self._frame(deadline, len(frames))
                if flags & COMMAND:
                    if frames:
                        raise InvalidArgument("malformed ZMTP message: a command between its frames")
                    self._on_command(payload, deadline)
                    continue
                frames.append(payload)
                if not flags & MORE:
                    self.midway = False
                    return frames
        except _Late:
            if self.midway:
                self.close()               # a message cut in two: the stream is out of step
            return None
        except BerthError as e:
            raise self._broken(e) from None

    # --- inside ---

    def _broken(self, e: BerthError) -> BerthError:
        self.close()
        return type(e)(f"{self.name}: {e}")

    def _on_command(self, body: bytes, deadline: float) -> None:
        """PING is answered; ERROR ends the connection; the rest (PONG, a repeated READY,
        commands of later revisions) means nothing to a DEALER and is skipped."""
        self.midway = False
        name, data = parse_command(body)
        if name == b"PING":
            self._write([command(b"PONG", data[2:18])], deadline)     # TTL, then the context
        elif name == b"ERROR":
            raise Unavailable(f"ended the connection: {_error_reason(data)}")

    def _write(self, chunks: list[bytes], deadline: float) -> None:
        views = [memoryview(c) for c in chunks if c]
        if self.sock is None:
            raise Hangup("the connection is closed")
        while views:
            try:
                sent = self.sock.sendmsg(views, (), _socket.MSG_NOSIGNAL)
            except BlockingIOError:
                if not self._wait(select.POLLOUT, deadline):
                    raise DeadlineExceeded("did not take the message in time") from None
                continue
            except OSError as e:
                raise Hangup(f"closed the connection ({e.strerror})") from None
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def _frame(self, deadline: float, index: int) -> tuple[int, bytes]:
        """(flags, payload) of the next frame, frame `index` of its message."""
        flags = self._take(1, deadline)[0]
        self.midway = True
        raw = self._take(size_length(flags), deadline)
        size = raw[0] if len(raw) == 1 else struct.unpack("!Q", raw)[0]
        check_frame(flags, size, index)
        return flags, self._take(size, deadline)

    def _take(self, n: int, deadline: float) -> bytes:
        """The next `n` bytes of the stream."""
        if self.sock is None:
            raise Hangup("the connection is closed")
        if n <= READ_CHUNK:
            while len(self.rbuf) < n:
                self._read(deadline)
            data = bytes(self.rbuf[:n])
            del self.rbuf[:n]
            return data
        # A large frame is read straight into its own buffer, not through rbuf.
        out = bytearray(n)
        have = min(n, len(self.rbuf))
        out[:have] = self.rbuf[:have]
        del self.rbuf[:have]
        view = memoryview(out)
        while have < n:
            have += self._receive(lambda: self.sock.recv_into(view[have:]), deadline)
        return bytes(out)

    def _read(self, deadline: float) -> None:
        """More bytes into rbuf: what the kernel has, once it has some."""
        data = self._receive(lambda: self.sock.recv(READ_CHUNK), deadline)
        if data:
            self.rbuf += data

    def _receive(self, recv, deadline: float):
        """`recv()` once the socket is readable: what it returns (0 for a spurious wake-up).
        A peer that closed or reset is a Hangup."""
        if not self._wait(select.POLLIN, deadline):
            raise _Late
        try:
            got = recv()
        except BlockingIOError:
            return 0
        except OSError as e:
            raise Hangup(f"closed the connection ({e.strerror})") from None
        if not got:
            raise Hangup("closed the connection")
        return got

    def _wait(self, event: int, deadline: float) -> bool:
        """Whether the socket became ready for `event` (or hung up) before the deadline."""
        self.poller.modify(self.sock, event)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.poller.poll(max(1, int(remaining * 1000 + 0.999))):
                return True


def _error_reason(data: bytes) -> str:
    return bytes(data[1:1 + data[0]]).decode("utf-8", "replace") if data else "no reason given"
