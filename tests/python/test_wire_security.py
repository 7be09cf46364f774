"""COLLECTIVES_WIRE_SECURITY end to end: the real handshake, the keys it derives and the core's
frames, through a relay that passes the handshake through untouched and then changes one byte
of the first frame, as an attacker on the path (or one who replaced a published address)
would. Protected frames are refused on both ranks; unprotected ones (the control that shows
the relay works) give a silently wrong sum."""

import secrets
import socket
import threading
import time

import numpy as np
import pytest

from collectives import _core
from collectives._handshake import client_handshake, server_handshake
from collectives.errors import CollectiveError

SECRET = secrets.token_bytes(32)
JOB = secrets.token_bytes(16)
# What the client sends during the handshake (protocol 3): prefix 6, hello 55, security 1, proof 33.
CLIENT_HANDSHAKE_BYTES = 6 + 55 + 1 + 33
HEADER_BYTES = 50
FLOAT32 = list(_core.DTYPES).index("float32")
SUM = list(_core.OPS).index("sum")


def _pump(source, sink, altered_at=None):
    """Copies one direction, changing the byte at offset `altered_at` of the stream."""
    seen = 0
    try:
        while True:
            data = bytearray(source.recv(65536))
            if not data:
                break
            if altered_at is not None and seen <= altered_at < seen + len(data):
                data[altered_at - seen] ^= 0x40
            seen += len(data)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _relay(listener, target, altered_at):
    inbound, _ = listener.accept()
    outbound = socket.create_connection(target)
    threads = [threading.Thread(target=_pump, args=(inbound, outbound, altered_at), daemon=True),
               threading.Thread(target=_pump, args=(outbound, inbound), daemon=True)]
    for thread in threads:
        thread.start()
    return threads, (inbound, outbound)


# Where the relay changes the stream from rank 1 to rank 0: a payload byte of its first frame.
IN_THE_FIRST_PAYLOAD = CLIENT_HANDSHAKE_BYTES + HEADER_BYTES + 5


def _allreduce_through_a_relay(security, altered_at=IN_THE_FIRST_PAYLOAD):
    """Ranks 0 and 1 as threads of this process, rank 1's connection to rank 0 relayed, the
    byte at `altered_at` changed (None: nothing); each rank's (sum, error text or None). Each
    rank runs a barrier after the all-reduce: a rank whose own messages all came intact may
    finish the all-reduce (recursive doubling exchanges one message each way), but hears of
    its peer's failure by its next collective."""
    rank0 = socket.create_server(("127.0.0.1", 0))
    relay = socket.create_server(("127.0.0.1", 0))
    relayed = {}
    relaying = threading.Thread(target=lambda: relayed.update(
        job=_relay(relay, rank0.getsockname(), altered_at)), daemon=True)
    relaying.start()
    links, errors = {}, {}

    def server():
        conn, _ = rank0.accept()
        hello = server_handshake(conn, SECRET, 0, time.monotonic() + 10, job_id=JOB, security=security)
        links[0] = hello.keys.link(conn)

    def client():
        sock = socket.create_connection(relay.getsockname())
        keys = client_handshake(sock, SECRET, 1, 0, 0, time.monotonic() + 10, job_id=JOB, security=security)
        links[1] = keys.link(sock)

    handshakes = [threading.Thread(target=server), threading.Thread(target=client)]
    for thread in handshakes:
        thread.start()
    for thread in handshakes:
        thread.join(timeout=20)
    relaying.join(timeout=20)
    options = _core.Options()
    options.timeout_seconds = 20
    names = ["rank 0", "rank 1"]
    comms = [_core.Communicator(0, 2, [[], [links[0]]], names, options),
             _core.Communicator(1, 2, [[links[1]], []], names, options)]
    data = [np.full(1000, 1.0, np.float32), np.full(1000, 2.0, np.float32)]

    def run(rank):
        try:
            for work in (comms[rank].allreduce(data[rank].ctypes.data, data[rank].size, FLOAT32, SUM),
                         comms[rank].barrier()):
                while not work.wait_for(0.1):
                    pass
        except CollectiveError as e:
            errors[rank] = str(e)

    ranks = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a rank hung"
    for comm in comms:
        comm.close()
    _, sockets = relayed["job"]
    for sock in (*sockets, rank0, relay):
        sock.close()
    return [(data[rank], errors.get(rank)) for rank in (0, 1)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("security", ["mac", "aead"])
def test_a_relayed_frame_that_was_changed_is_refused_on_every_rank(security):
    (_, error0), (_, error1) = _allreduce_through_a_relay(security)
    assert error0 is not None and "rank 1 sent a frame that failed its integrity check" in error0
    assert f"COLLECTIVES_WIRE_SECURITY={security}" in error0
    assert error1 is not None and "rank 0 aborted" in error1 and "failed its integrity check" in error1


@pytest.mark.timeout(60)
def test_without_protection_the_same_relay_changes_the_sum_unnoticed():
    (sum0, error0), (sum1, error1) = _allreduce_through_a_relay("none")
    assert error0 is None and error1 is None
    assert not np.array_equal(sum0, np.full(1000, 3.0, np.float32))  # the relay's work


@pytest.mark.timeout(60)
def test_an_untouched_relay_changes_nothing():
    """Integrity protects the frames; it does not forbid a path through a relay that only copies."""
    for result, error in _allreduce_through_a_relay("mac", altered_at=None):
        assert error is None and np.array_equal(result, np.full(1000, 3.0, np.float32))
