"""The acceptor of a worker's or reducer's port under strangers' connections: silent ones,
ones that send a hello and stall, floods from one address, and a process out of file
descriptors. Real sockets on 127.0.0.1; the job's peer is a real client_handshake."""

import queue
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from strangers import closed_within

from collectives import _handshake as hs
from collectives._handshake import PROTOCOL_VERSION, ROLE_WORKER, Acceptor, client_handshake, server_handshake
from collectives.errors import CollectiveError

pytestmark = pytest.mark.timeout(60)

SECRET = b"the job's secret, long enough 0123456789"
JOB = b"J" * hs.JOB_ID_BYTES


class _Server:
    """An Acceptor as a worker of rank 0 runs one, expecting ``ranks`` (connection 0 each)."""

    def __init__(self, ranks=(1,)):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.ranks = set(ranks)
        self.peers: "queue.Queue" = queue.Queue()
        self.refused: "queue.Queue" = queue.Queue()
        self.acceptor = Acceptor(self.listener, self._authenticate, lambda hello, conn: self.peers.put((hello, conn)),
                                 lambda address, error: self.refused.put((address, error)),
                                 expects=lambda hello, job: job == JOB and hello.rank in self.ranks).start()

    def _authenticate(self, conn):
        return server_handshake(conn, SECRET, 0, time.monotonic() + 20, job_id=JOB)

    def close(self):
        self.acceptor.stop()
        self.listener.close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


def _strangers(address, count):
    return [socket.create_connection(address) for _ in range(count)]


def _hello(rank, job=JOB):
    """A well-formed hello, as anyone who read the job id from the store can send."""
    return struct.pack("!4sH", b"COLL", PROTOCOL_VERSION) + struct.pack("!BIH16s32s", ROLE_WORKER, rank, 0, job,
                                                                          bytes(32))


def _join_as_rank_1(server, within=5.0):
    """The job's rank 1 connects and authenticates; returns the seconds it took."""
    start = time.monotonic()
    with socket.create_connection(server.address, timeout=within) as sock:
        client_handshake(sock, SECRET, 1, 0, 0, time.monotonic() + within, job_id=JOB)
        hello, conn = server.peers.get(timeout=within)
        conn.close()
    assert hello.rank == 1
    return time.monotonic() - start


def test_silent_strangers_holding_every_slot_do_not_keep_a_peer_out(server, monkeypatch):
    """More idle connections than there are slots (300 > 256, all from one address): the
    job's peer still gets through at once, and the silent ones go at the hello deadline."""
    monkeypatch.setattr(hs, "HELLO_TIMEOUT_S", 1.0)
    held = _strangers(server.address, 300)
    last, last_connected = held[-1], time.monotonic()  # the newest of them waits its full hello deadline
    try:
        assert _join_as_rank_1(server) < 2.0
        assert closed_within(last, 5.0)
        # From its accept (after its connect) to the deadline's 1 s; the join's time, which a
        # loaded machine stretches, counts for nothing.
        assert 0.8 < time.monotonic() - last_connected < 6.0
        reasons = {str(server.refused.get(timeout=5)[1]) for _ in range(len(held))}
        assert any("sent no hello within 1 s" in r for r in reasons), reasons
        assert any("to make room for a newer connection" in r for r in reasons), reasons
    finally:
        for sock in held:
            sock.close()


def test_one_address_holds_at_most_its_share(server):
    held = _strangers(server.address, hs.MAX_PENDING_PER_SOURCE + 20)
    try:
        evicted = [server.refused.get(timeout=5) for _ in range(20)]
        share = f"{hs.MAX_PENDING_PER_SOURCE} connections from 127.0.0.1"
        assert all(share in str(error) for _, error in evicted), evicted
        closed = [sock for sock in held if closed_within(sock, 0.01)]
        assert len(closed) == 20 and closed == held[:20]  # the oldest went first
    finally:
        for sock in held:
            sock.close()


def test_strangers_that_stall_after_a_hello_do_not_keep_a_peer_out(monkeypatch):
    """Strangers send a hello naming the expected rank (the job id is public) and never
    their proof: they fill every slot with handshakes under way, and the peer still gets in."""
    monkeypatch.setattr(hs, "MAX_PENDING_HANDSHAKES", 16)
    monkeypatch.setattr(hs, "MAX_PENDING_PER_SOURCE", 16)
    srv = _Server()
    held = _strangers(srv.address, 40)
    try:
        for sock in held:
            sock.sendall(_hello(rank=1))
        deadline = time.monotonic() + 10
        while srv.refused.qsize() < 40 - 16:  # each newcomer beyond 16 evicted the oldest
            assert time.monotonic() < deadline, srv.refused.qsize()
            time.sleep(0.05)
        assert _join_as_rank_1(srv) < 2.0
        address, error = srv.refused.get(timeout=5)
        assert "to make room for a newer connection" in str(error)
    finally:
        for sock in held:
            sock.close()
        srv.close()


def test_expected_peers_are_evicted_last(monkeypatch):
    """With every slot taken, a newcomer evicts a silent connection, then a hello that
    names nobody this process waits for, before a hello of an expected rank."""
    monkeypatch.setattr(hs, "MAX_PENDING_HANDSHAKES", 3)
    srv = _Server()
    try:
        expected, unexpected, silent = _strangers(srv.address, 3)
        expected.sendall(_hello(rank=1))
        unexpected.sendall(_hello(rank=5))  # a rank this process does not wait for
        time.sleep(0.5)  # both hellos are in and their handshakes under way; the silent one waits
        newcomers = []
        for _ in range(2):
            newcomers += _strangers(srv.address, 1)
            newcomers[-1].sendall(_hello(rank=1))
            time.sleep(0.5)
        assert closed_within(silent, 5) and closed_within(unexpected, 5)
        assert not closed_within(expected, 0.3)
        for sock in (expected, unexpected, silent, *newcomers):
            sock.close()
    finally:
        srv.close()


def test_garbage_and_early_close_are_refused_in_words(server):
    with socket.create_connection(server.address) as garbage:
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert closed_within(garbage, 5)
    socket.create_connection(server.address).close()
    reasons = sorted(str(server.refused.get(timeout=5)[1]) for _ in range(2))
    assert "before sending a hello" in reasons[0] and "not a collectives process" in reasons[1], reasons
    assert _join_as_rank_1(server) < 2.0


# Out of file descriptors (a lowered RLIMIT_NOFILE), in a child process that serves the
# acceptor: it logs that once, keeps its loop alive, and takes the job's peer (who queues
# behind strangers) by evicting strangers that hold descriptors.
EMFILE_SCRIPT = textwrap.dedent(r'''
    import logging, os, queue, resource, socket, sys, time
    from collectives._handshake import Acceptor, server_handshake
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    listener = socket.create_server(("127.0.0.1", 0))
    peers = queue.Queue()
    acceptor = Acceptor(listener, lambda c: server_handshake(c, b"s" * 32, 0, time.monotonic() + 10, job_id=b"J" * 16),
                        lambda hello, conn: peers.put(hello), lambda address, error: None).start()
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    spare = []
    try:
        while True:  # use up the rest, so that the acceptor's accept() fails with EMFILE
            spare.append(socket.socket())
    except OSError:
        pass
    print(listener.getsockname()[1], flush=True)
    sys.stdin.readline()  # the strangers are queued: free a few descriptors
    for sock in spare[:4]:
        sock.close()
    print("peer", peers.get(timeout=20).rank, flush=True)
    acceptor.stop()
''')


def test_out_of_file_descriptors_the_acceptor_keeps_serving(tmp_path):
    script = tmp_path / "emfile.py"
    script.write_text(EMFILE_SCRIPT)
    child = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    strangers = []
    try:
        address = ("127.0.0.1", int(child.stdout.readline()))
        strangers = _strangers(address, 20)  # queued in the backlog; accept() fails on them
        time.sleep(0.5)
        child.stdin.write("go\n")
        child.stdin.flush()
        try:
            with socket.create_connection(address) as sock:
                client_handshake(sock, b"s" * 32, 1, 0, 0, time.monotonic() + 20, job_id=b"J" * 16)
        finally:
            stdout, stderr = child.communicate(timeout=30)
    finally:
        child.kill()
        for sock in strangers:
            sock.close()
    assert child.returncode == 0, stderr
    assert stdout.strip() == "peer 1"
    assert stderr.count("cannot accept connections for now") == 1, stderr
    assert "Too many open files" in stderr and "Traceback" not in stderr, stderr
