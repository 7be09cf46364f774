"""The HMAC handshake, over real TCP connections on 127.0.0.1."""

import hashlib
import hmac
import secrets
import socket
import struct
import threading
import time

import pytest

from collectives import _handshake as hs
from collectives._handshake import (PROTOCOL_VERSION, ROLE_REDUCER, ROLE_WORKER, PeerHello, client_handshake,
                                    server_handshake)
from collectives.errors import AuthenticationError, CollectiveError, ProtocolVersionError, TimeoutError

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple 0123456789"
JOB = b"J" * hs.JOB_ID_BYTES


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def _connect(listener):
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


def _deadline(seconds=5.0):
    return time.monotonic() + seconds


class _Side(threading.Thread):
    """Runs one side of a handshake in a thread and keeps its result or exception."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except Exception as e:  # noqa: BLE001 - inspected by the test
            self.error = e

    def outcome(self):
        self.join(timeout=10)
        assert not self.is_alive()
        return self.result, self.error


def _pair(listener, client_kwargs=None, server_kwargs=None):
    client, server = _connect(listener)
    c = dict(secret=SECRET, my_rank=3, peer_rank=1, conn_index=2, deadline=_deadline(), job_id=JOB)
    s = dict(secret=SECRET, my_rank=1, deadline=_deadline(), job_id=JOB)
    c.update(client_kwargs or {})
    s.update(server_kwargs or {})
    server_side = _Side(server_handshake, server, **s)
    client_side = _Side(client_handshake, client, **c)
    return client, server, client_side.outcome(), server_side.outcome()


def test_good_pair(listener):
    client, server, (client_keys, client_error), (hello, server_error) = _pair(listener)
    assert client_error is None and server_error is None
    assert hello == PeerHello(rank=3, conn_index=2, role=ROLE_WORKER, keys=hello.keys)
    assert client.gettimeout() is None and server.gettimeout() is None  # blocking again
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"
    client.close()
    server.close()


def test_both_ends_derive_the_same_fresh_session_keys(listener):
    """Each direction has a key of its own, both ends agree on them, and a new handshake
    between the same two processes gives new ones (fresh challenges on both sides)."""
    sessions = []
    for _ in range(2):
        client, server, (client_keys, _), (hello, _) = _pair(listener)
        client.close()
        server.close()
        assert client_keys.security == hello.keys.security == "mac"
        assert (client_keys.send, client_keys.recv) == (hello.keys.recv, hello.keys.send)
        assert client_keys.send != client_keys.recv and len(client_keys.send) == 32
        sessions.append(client_keys)
    assert not {sessions[0].send, sessions[0].recv} & {sessions[1].send, sessions[1].recv}


@pytest.mark.parametrize("client_security, server_security", [("none", "mac"), ("aead", "mac"), ("mac", "none")])
def test_another_wire_security_is_refused_on_both_sides(listener, client_security, server_security):
    _, _, (_, client_error), (_, server_error) = _pair(
        listener, client_kwargs=dict(security=client_security), server_kwargs=dict(security=server_security))
    for error in (client_error, server_error):
        assert isinstance(error, CollectiveError)
        assert (f"uses COLLECTIVES_WIRE_SECURITY={client_security} and rank 1 uses {server_security}: set the same "
                "value on every worker and reducer") in str(error)


def test_reducer_role_is_carried(listener):
    _, _, (_, client_error), (hello, _) = _pair(
        listener, client_kwargs=dict(role=ROLE_REDUCER, my_rank=0), server_kwargs=dict(my_rank=1))
    assert client_error is None
    assert hello.role == ROLE_REDUCER and hello.rank == 0


def test_wrong_secret_fails_on_both_sides(listener):
    wrong = b"a different secret"
    _, _, (_, client_error), (_, server_error) = _pair(listener, client_kwargs=dict(secret=wrong))
    assert isinstance(client_error, AuthenticationError)
    assert isinstance(server_error, AuthenticationError)
    assert "rank 1 at 127.0.0.1:" in str(client_error)  # the client names the server
    assert "rank 3 at 127.0.0.1:" in str(server_error)  # and the server the client
    for error in (client_error, server_error):
        assert "COLLECTIVES_TOKEN" in str(error)
        for secret in (SECRET, wrong):
            assert secret.decode() not in str(error) and secret.hex() not in str(error)


@pytest.mark.parametrize("side", ["client", "server"])
def test_protocol_version_mismatch(listener, side):
    other = PROTOCOL_VERSION + 1
    kwargs = dict(protocol_version=other)
    _, _, (_, client_error), (_, server_error) = _pair(
        listener, client_kwargs=kwargs if side == "client" else None,
        server_kwargs=kwargs if side == "server" else None)
    for error in (client_error, server_error):
        assert isinstance(error, ProtocolVersionError)
        assert f"protocol {PROTOCOL_VERSION}" in str(error) or f"speaks {PROTOCOL_VERSION}" in str(error)
        assert str(other) in str(error)
        assert "install the same collectives version on every host" in str(error)
    assert str(client_error).startswith("rank 1 at 127.0.0.1:")


def test_peer_of_another_job_is_refused(listener):
    _, _, (_, client_error), (_, server_error) = _pair(listener, client_kwargs=dict(job_id=b"K" * hs.JOB_ID_BYTES))
    assert isinstance(client_error, CollectiveError) and "another job" in str(client_error)
    assert isinstance(server_error, CollectiveError) and "another job" in str(server_error)
    assert not isinstance(client_error, AuthenticationError)


def test_unexpected_peer_rank_is_refused(listener):
    # the client dialled rank 2's address but rank 1 answered
    _, _, (_, client_error), (_, server_error) = _pair(listener, client_kwargs=dict(peer_rank=2))
    assert isinstance(client_error, CollectiveError) and "expected rank 2" in str(client_error)
    assert isinstance(server_error, CollectiveError)


def test_check_refusal_reaches_the_client(listener):
    _, _, (_, client_error), (_, server_error) = _pair(
        listener, server_kwargs=dict(check=lambda hello: f"no room for rank {hello.rank}"))
    assert "no room for rank 3" in str(client_error)
    assert "no room for rank 3" in str(server_error)


def test_garbage_client_is_refused_and_server_keeps_serving(listener):
    outcomes = []

    def serve(count):
        for _ in range(count):
            conn, _ = listener.accept()
            try:
                outcomes.append(server_handshake(conn, SECRET, 1, _deadline(), job_id=JOB))
            except CollectiveError as e:
                outcomes.append(e)
            conn.close()

    server_thread = threading.Thread(target=serve, args=(2,), daemon=True)
    server_thread.start()
    garbage = socket.create_connection(listener.getsockname())
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    garbage.settimeout(5)
    try:
        assert garbage.recv(100) == b""  # dropped without an answer
    except ConnectionResetError:
        pass  # closed with the garbage unread, which makes the kernel send RST
    garbage.close()
    good = socket.create_connection(listener.getsockname())
    client_handshake(good, SECRET, 2, 1, 0, _deadline(), job_id=JOB)
    server_thread.join(timeout=10)
    assert isinstance(outcomes[0], CollectiveError) and "not a collectives process" in str(outcomes[0])
    assert outcomes[1][:3] == PeerHello(2, 0, ROLE_WORKER)[:3]
    good.close()


def test_silent_client_hits_the_deadline(listener):
    client, server = _connect(listener)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not complete the connection handshake"):
        server_handshake(server, SECRET, 1, time.monotonic() + 0.5, job_id=JOB)
    assert 0.4 < time.monotonic() - start < 3
    client.close()
    server.close()


def test_silent_server_hits_the_deadline(listener):
    client, server = _connect(listener)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="rank 1 at 127.0.0.1"):
        client_handshake(client, SECRET, 3, 1, 0, time.monotonic() + 0.5, job_id=JOB)
    assert 0.4 < time.monotonic() - start < 3
    client.close()
    server.close()


def _raw_hello(rank=3, conn=0, job=JOB):
    challenge = secrets.token_bytes(32)
    return struct.pack("!4sH", b"COLL", PROTOCOL_VERSION) + struct.pack("!BIH16s32sB", ROLE_WORKER, rank, conn, job,
                                                                          challenge, 1)  # wire security mac


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def _read_server_hello(sock):
    prefix_status = _recv_exact(sock, 7)
    assert prefix_status[:4] == b"COLL" and prefix_status[6] == 0
    server_hello = _recv_exact(sock, struct.calcsize("!BI32s"))
    return server_hello, _recv_exact(sock, 32)


def test_reflected_proof_is_rejected(listener):
    """An attacker without the secret sends the server's own MAC back as its proof."""
    server_side = _Side(lambda: server_handshake(listener.accept()[0], SECRET, 1, _deadline(), job_id=JOB))
    attacker = socket.create_connection(listener.getsockname())
    attacker.sendall(_raw_hello())
    _, server_mac = _read_server_hello(attacker)
    attacker.sendall(struct.pack("!B32s", 0, server_mac))
    _, error = server_side.outcome()
    assert isinstance(error, AuthenticationError)
    attacker.close()


def test_replayed_proof_is_rejected(listener):
    """A proof recorded from one connection does not open another: the server's challenge differs."""
    hello = _raw_hello()
    # An honest client's proof for the first connection (computed here with the secret,
    # as a recording of a real client would hold it).
    first = _Side(lambda: server_handshake(listener.accept()[0], SECRET, 1, _deadline(), job_id=JOB))
    recorder = socket.create_connection(listener.getsockname())
    recorder.sendall(hello)
    server_hello, _ = _read_server_hello(recorder)
    transcript = b"collectives-handshake|%d|" % PROTOCOL_VERSION + JOB + hello[6:] + server_hello
    proof = hmac.new(SECRET, b"client" + transcript, hashlib.sha256).digest()
    recorder.sendall(struct.pack("!B32s", 0, proof))
    hello_seen, error = first.outcome()
    assert error is None and hello_seen[:3] == (3, 0, ROLE_WORKER)
    recorder.close()

    second = _Side(lambda: server_handshake(listener.accept()[0], SECRET, 1, _deadline(), job_id=JOB))
    replayer = socket.create_connection(listener.getsockname())
    replayer.sendall(hello)
    _read_server_hello(replayer)
    replayer.sendall(struct.pack("!B32s", 0, proof))
    _, error = second.outcome()
    assert isinstance(error, AuthenticationError)
    replayer.close()


def test_oversize_refusal_text_is_rejected(listener):
    client, server = _connect(listener)
    server.sendall(struct.pack("!4sHB", b"COLL", PROTOCOL_VERSION, 2) + struct.pack("!H", 60000))
    with pytest.raises(CollectiveError, match="malformed"):
        client_handshake(client, SECRET, 3, 1, 0, _deadline(2), job_id=JOB)
    client.close()
    server.close()
