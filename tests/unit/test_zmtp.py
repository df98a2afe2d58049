"""ZMTP framing (bus/zmtp.py): greeting, commands, frame headers and limits, and a Peer reading
bytes written by hand on the other end of a socketpair."""
import socket
import struct
import time

import pytest

from bus import zmtp
from bus.codec import MAX_BULK_FRAME, MAX_FRAMES, MAX_HEADER
from bus.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

# What libzmq 4.3 sends: ZMTP 3.1, NULL, then a READY with Socket-Type and an empty Identity.
LIBZMQ_GREETING = b"\xff" + bytes(7) + b"\x01\x7f" + b"\x03\x01" + zmtp.MECHANISM + bytes(32)
ROUTER_READY = zmtp.command(b"READY", zmtp.encode_properties({b"Socket-Type": b"ROUTER", b"Identity": b""}))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_our_greeting_is_zmtp_3_0_null_as_client():
    g = zmtp.GREETING
    assert len(g) == zmtp.GREETING_SIZE == 64
    assert g[0] == 0xFF and g[9] == 0x7F
    assert g[10:12] == b"\x03\x00"
    assert g[12:32] == b"NULL" + bytes(16)
    assert g[32] == 0                     # as-server
    assert g[33:] == bytes(31)
    zmtp.check_greeting(g)


def test_a_libzmq_greeting_is_accepted_whole_and_in_pieces():
    for n in range(len(LIBZMQ_GREETING) + 1):
        zmtp.check_greeting(LIBZMQ_GREETING[:n])


@pytest.mark.parametrize("greeting, says", [
    (b"HTTP/1.1 400 Bad Request\r\n", "does not speak ZMTP"),
    (b"\xff" + bytes(8) + b"\x00", "does not speak ZMTP"),           # ZMTP 1.0: no 0x7F
    (LIBZMQ_GREETING[:10] + b"\x01\x00", "2.0 or older"),
    (LIBZMQ_GREETING[:12] + b"CURVE".ljust(20, b"\0"), "'CURVE' security mechanism"),
])
def test_a_greeting_that_is_not_zmtp_3_null_is_refused_as_soon_as_it_shows(greeting, says):
    with pytest.raises(Unavailable, match=says):
        zmtp.check_greeting(greeting)


def test_the_first_byte_is_enough_to_refuse_a_stranger():
    with pytest.raises(Unavailable):
        zmtp.check_greeting(b"H")


def test_frame_headers_are_short_up_to_255_bytes_and_long_beyond():
    assert zmtp.frame_header(0) == b"\x00\x00"
    assert zmtp.frame_header(255, zmtp.MORE) == b"\x01\xff"
    assert zmtp.frame_header(256) == b"\x02" + struct.pack("!Q", 256)
    assert zmtp.frame_header(1 << 33, zmtp.MORE) == b"\x03" + struct.pack("!Q", 1 << 33)


def test_every_frame_but_the_last_has_more():
    chunks = zmtp.encode_message([b"head", b"", b"x" * 300])
    assert chunks == [b"\x01\x04", b"head", b"\x01\x00", b"", b"\x02" + struct.pack("!Q", 300), b"x" * 300]
    with pytest.raises(InvalidArgument):
        zmtp.encode_message([])


def test_ready_names_a_dealer_without_identity():
    flags, size = zmtp.READY[0], zmtp.READY[1]
    assert flags == zmtp.COMMAND and size == len(zmtp.READY) - 2
    name, data = zmtp.parse_command(zmtp.READY[2:])
    assert name == b"READY"
    assert zmtp.parse_properties(data) == {"socket-type": b"DEALER"}


def test_properties_are_case_insensitive_and_malformed_ones_refused():
    assert zmtp.parse_properties(zmtp.encode_properties({b"SOCKET-TYPE": b"ROUTER", b"X-a": b""})) == \
        {"socket-type": b"ROUTER", "x-a": b""}
    good = zmtp.encode_properties({b"Socket-Type": b"ROUTER"})
    for bad in (good[:-1], good[:5], b"\x00", good + b"\x03ab"):
        with pytest.raises(InvalidArgument):
            zmtp.parse_properties(bad)
    with pytest.raises(InvalidArgument):
        zmtp.parse_command(b"\x09READY")
    with pytest.raises(InvalidArgument):
        zmtp.parse_command(b"")


def test_reserved_flag_bits_and_a_command_with_more_are_malformed():
    assert zmtp.size_length(0) == 1 and zmtp.size_length(zmtp.LONG | zmtp.MORE) == 8
    for flags in (0x08, 0x80, zmtp.COMMAND | zmtp.MORE):
        with pytest.raises(InvalidArgument):
            zmtp.size_length(flags)


def test_frame_limits_are_bus_codecs():
    zmtp.check_frame(0, MAX_HEADER, 0)
    zmtp.check_frame(0, MAX_BULK_FRAME, 1)
    zmtp.check_frame(0, 0, MAX_FRAMES - 1)
    for size, index in ((MAX_HEADER + 1, 0), (MAX_BULK_FRAME + 1, 1), (0, MAX_FRAMES)):
        with pytest.raises(ResourceExhausted):
            zmtp.check_frame(0, size, index)
    with pytest.raises(ResourceExhausted):
        zmtp.check_frame(zmtp.COMMAND, zmtp.MAX_COMMAND + 1, 0)


# --- a Peer, with the other end written by hand ---------------------------------------------------

@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    peer = zmtp.Peer(ours, "the peer")
    yield peer, theirs
    peer.close()
    theirs.close()


def greeted(pair):
    peer, theirs = pair
    theirs.sendall(LIBZMQ_GREETING + ROUTER_READY)
    peer.handshake(soon())
    assert recv_exactly(theirs, 64 + len(zmtp.READY)) == zmtp.GREETING + zmtp.READY
    return peer, theirs


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def test_handshake_with_a_router(pair):
    peer, _ = greeted(pair)
    assert peer.peer_type == b"ROUTER"


def test_handshake_refuses_a_socket_type_a_dealer_cannot_talk_to(pair):
    peer, theirs = pair
    theirs.sendall(LIBZMQ_GREETING + zmtp.command(b"READY", zmtp.encode_properties({b"Socket-Type": b"PUB"})))
    with pytest.raises(Unavailable, match="the peer: is a PUB socket"):
        peer.handshake(soon())
    assert peer.gone()


def test_handshake_reports_the_peers_error_command(pair):
    peer, theirs = pair
    theirs.sendall(LIBZMQ_GREETING + zmtp.command(b"ERROR", b"\x0eaccess denied!"))
    with pytest.raises(Unavailable, match="refused the connection: access denied!"):
        peer.handshake(soon())


def test_garbage_instead_of_a_greeting_is_refused_without_waiting_for_64_bytes(pair):
    peer, theirs = pair
    theirs.sendall(b"SSH-2.0\r\n")
    started = time.monotonic()
    with pytest.raises(Unavailable, match="does not speak ZMTP"):
        peer.handshake(soon(30))
    assert time.monotonic() - started < 5


def test_silence_instead_of_a_greeting_is_a_deadline(pair):
    peer, _ = pair
    with pytest.raises(DeadlineExceeded, match="sent no ZMTP greeting in time"):
        peer.handshake(soon(0.1))


def test_messages_short_and_long_frames_one_by_one(pair):
    peer, theirs = greeted(pair)
    big = bytes(range(250)) * 400                       # 100 kB: read past the small buffer
    wire = b"".join(zmtp.encode_message([b"env", b"", big])) + b"".join(zmtp.encode_message([b"next"]))
    theirs.sendall(wire)
    assert peer.recv(soon()) == [b"env", b"", big]
    assert peer.recv(soon()) == [b"next"]
    peer.send([b"out", b"y" * 1000], soon())
    assert recv_exactly(theirs, 2 + 3 + 9 + 1000) == b"\x01\x03out\x02" + struct.pack("!Q", 1000) + b"y" * 1000


def test_ping_is_answered_with_pong_and_other_commands_are_skipped(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(zmtp.command(b"PING", b"\x00\x0actx") + zmtp.command(b"SUBSCRIBE", b"x")
                   + b"".join(zmtp.encode_message([b"after"])))
    assert peer.recv(soon()) == [b"after"]
    assert recv_exactly(theirs, len(zmtp.command(b"PONG", b"ctx"))) == zmtp.command(b"PONG", b"ctx")


def test_a_command_between_frames_of_a_message_is_malformed(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(b"\x01\x01a" + zmtp.command(b"PING", b"\x00\x00"))
    with pytest.raises(InvalidArgument, match="the peer: malformed ZMTP message"):
        peer.recv(soon())
    assert peer.gone()


def test_reserved_flag_bits_close_the_connection(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(b"\x10\x01a")
    with pytest.raises(InvalidArgument, match="reserved flag bits"):
        peer.recv(soon())
    assert peer.gone()


def test_a_frame_beyond_the_limit_is_refused_on_its_header_alone(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(b"\x03" + struct.pack("!Q", 1) + b"e" + b"\x02" + struct.pack("!Q", MAX_BULK_FRAME + 1))
    with pytest.raises(ResourceExhausted, match=f"exceeds the limit of {MAX_BULK_FRAME}"):
        peer.recv(soon())                 # none of the 16 MiB was sent: it did not wait for them


def test_too_many_frames_are_refused(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(b"\x01\x00" * MAX_FRAMES + b"\x00\x00")
    with pytest.raises(ResourceExhausted, match=f"more than {MAX_FRAMES} frames"):
        peer.recv(soon())


def test_a_deadline_between_messages_keeps_the_connection(pair):
    peer, theirs = greeted(pair)
    assert peer.recv(time.monotonic() + 0.05) is None
    assert not peer.gone()
    theirs.sendall(b"\x00\x02ok")
    assert peer.recv(soon()) == [b"ok"]


def test_a_deadline_inside_a_message_closes_the_connection(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(b"\x01\x02ok\x00")
    assert peer.recv(time.monotonic() + 0.05) is None
    assert peer.gone()


def test_the_peer_closing_is_a_hangup(pair):
    peer, theirs = greeted(pair)
    theirs.sendall(b"\x01\x01a")
    theirs.close()
    with pytest.raises(zmtp.Hangup, match="the peer: closed the connection"):
        peer.recv(soon())


def test_gone_keeps_what_arrived_and_sees_a_hangup(pair):
    peer, theirs = greeted(pair)
    assert not peer.gone()
    theirs.sendall(b"\x00\x01z")
    assert not peer.gone()
    assert peer.recv(soon()) == [b"z"]
    theirs.close()
    assert peer.gone()
    with pytest.raises(zmtp.Hangup):
        peer.send([b"late"], soon())


def test_sending_to_a_peer_that_stopped_reading_is_bounded_by_the_deadline(pair):
    peer, _ = greeted(pair)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not take the message in time"):
        peer.send([b"x" * (8 << 20)], time.monotonic() + 0.2)
    assert time.monotonic() - started < 5
    assert peer.gone()                    # half a message went out: the stream is out of step
