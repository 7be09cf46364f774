"""The store under strangers who can reach its port: trickled requests, idle connections,
more connections than it serves, large requests sent slowly, a process out of file
descriptors; and the job's signed records. Real sockets on 127.0.0.1."""

import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from strangers import closed_within

from collectives import _store
from collectives._rendezvous import signed_store
from collectives._store import SIGNATURE_BYTES, SignedStore, StoreClient, StoreServer, open_record, sign_record
from collectives.errors import AuthenticationError

pytestmark = pytest.mark.timeout(60)

SECRET = b"the job's secret, long enough 0123456789"


@pytest.fixture
def server():
    srv = StoreServer("127.0.0.1", 0).start()
    yield srv
    srv.close()


def _set_header(key: bytes, value_length: int) -> bytes:
    """The start of a SET whose value is announced but not (yet) sent."""
    return struct.pack("!BHI", 1, 2, len(key)) + key + struct.pack("!I", value_length)


def test_a_trickled_request_is_closed_at_its_whole_deadline(server, monkeypatch):
    """A byte every 0.2 s keeps each read short, but the request as a whole has 1 s."""
    monkeypatch.setattr(_store, "MESSAGE_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        start = time.monotonic()
        slow.sendall(_set_header(b"k", 100))
        closed = False
        while time.monotonic() - start < 5:
            try:
                slow.sendall(b"x")
            except OSError:
                closed = True
                break
            if closed_within(slow, 0.2):
                closed = True
                break
        assert closed and 0.9 < time.monotonic() - start < 2.5


def test_idle_connections_are_closed_and_clients_come_back(server, monkeypatch):
    monkeypatch.setattr(_store, "IDLE_TIMEOUT_S", 0.5)
    client = StoreClient("127.0.0.1", server.port, timeout=5)
    try:
        client.set("k", b"v")
        with socket.create_connection(("127.0.0.1", server.port)) as idle:
            assert closed_within(idle, 3)
        time.sleep(1.0)  # the client's connection was closed meanwhile, with a goodbye
        assert client.get("k") == b"v"  # it reconnected
        assert client.add("n", 2) == 2  # once: a request is never sent to a closed connection
    finally:
        client.close()


def test_a_crowd_of_idle_connections_does_not_keep_the_job_out():
    """More connections than it serves: each newcomer takes the place of the one that
    waited longest, and the clients that make requests keep working."""
    srv = StoreServer("127.0.0.1", 0, max_connections=8).start()
    early = StoreClient("127.0.0.1", srv.port, timeout=5)
    crowd = []
    try:
        early.set("before", b"1")
        for _ in range(30):
            crowd.append(socket.create_connection(("127.0.0.1", srv.port)))
            early.check(["before"])  # busy: never the longest waiting
        late = StoreClient("127.0.0.1", srv.port, timeout=5)
        late.set("after", b"2")
        assert early.get("after") == b"2" and late.get("before") == b"1"
        assert sum(closed_within(sock, 0.05) for sock in crowd) >= 30 - 8
        late.close()
    finally:
        early.close()
        for sock in crowd:
            sock.close()
        srv.close()


def test_a_client_that_is_evicted_while_idle_reconnects():
    srv = StoreServer("127.0.0.1", 0, max_connections=2).start()
    try:
        first = StoreClient("127.0.0.1", srv.port, timeout=5)
        first.set("k", b"v")
        second = StoreClient("127.0.0.1", srv.port, timeout=5)
        third = StoreClient("127.0.0.1", srv.port, timeout=5)
        # Once the server has accepted third (before it serves third's request), it closes
        # second, which has made no request yet; then each reconnect closes the one idle longest.
        assert third.get("k") == b"v"
        assert second.get("k") == b"v" and first.get("k") == b"v" and third.get("k") == b"v"
        for client in (first, second, third):
            client.close()
    finally:
        srv.close()


def test_large_requests_sent_slowly_are_bounded_in_all(monkeypatch):
    """Each stranger announces a large SET and sends part of it: together they may hold
    only the shared budget; beyond it a connection is closed, and the job's small requests
    go on."""
    monkeypatch.setattr(_store, "MAX_REQUEST_BYTES_IN_FLIGHT", 1 << 20)
    server = StoreServer("127.0.0.1", 0).start()
    client = StoreClient("127.0.0.1", server.port, timeout=5)
    strangers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        for index, sock in enumerate(strangers):
            sock.sendall(_set_header(b"big%d" % index, _store.MAX_VALUE_BYTES) + bytes(400 << 10))
        time.sleep(0.5)
        closed = [closed_within(sock, 0.5) for sock in strangers]
        assert closed.count(True) >= 1 and closed.count(False) >= 2, closed
        client.set("small", b"fine")
        assert client.get("small") == b"fine"
    finally:
        client.close()
        for sock in strangers:
            sock.close()
        server.close()


# A store in a child process, whose memory the test reads from /proc.
CHILD_STORE = textwrap.dedent(r'''
    import logging, os, resource, socket, sys, time
    from collectives._store import StoreServer
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    server = StoreServer("127.0.0.1", 0).start()
    if len(sys.argv) > 1:  # an open-file limit that leaves this many descriptors free
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(server.port, flush=True)
    sys.stdin.read()
''')


def _child_store(tmp_path, *args):
    script = tmp_path / "store.py"
    script.write_text(CHILD_STORE)
    child = subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return child, int(child.stdout.readline())


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_requests_that_announce_much_and_send_little_cost_little_memory(tmp_path):
    """200 connections each announce a 1 MiB value and send one byte of it: the server holds
    the bytes that came, not the ones announced (it grew by ~2 MiB each before)."""
    child, port = _child_store(tmp_path)
    strangers = []
    try:
        before = _rss_mib(child.pid)
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(_set_header(b"k%d" % index, _store.MAX_VALUE_BYTES) + b"x")
            strangers.append(sock)
        time.sleep(1.0)
        grown = _rss_mib(child.pid) - before
        assert grown < 40, f"the store grew by {grown:.0f} MiB for 200 trickled requests"
    finally:
        for sock in strangers:
            sock.close()
        child.kill()
        child.wait()


def test_out_of_file_descriptors_the_store_keeps_serving(tmp_path):
    """Its accept loop used to die on EMFILE and never accept again."""
    child, port = _child_store(tmp_path, "20")
    crowd = []
    try:
        crowd = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]  # more than it can hold
        time.sleep(0.5)
        client = StoreClient("127.0.0.1", port, timeout=10)
        client.set("k", b"v")
        assert client.get("k") == b"v"
        client.close()
        _, stderr = child.communicate("", timeout=20)
    finally:
        for sock in crowd:
            sock.close()
        child.kill()
    assert stderr.count("cannot accept connections for now") == 1, stderr
    assert "Too many open files" in stderr and "Traceback" not in stderr, stderr


# --- signed records ---------------------------------------------------------------------

def test_signed_records_round_trip_and_refuse_tampering(server):
    raw = StoreClient("127.0.0.1", server.port, timeout=5)
    signed = SignedStore(raw, SECRET)
    try:
        signed.set("collectives/reducer/0", b'{"host": "127.0.0.1", "port": 4000}')
        assert signed.get("collectives/reducer/0") == b'{"host": "127.0.0.1", "port": 4000}'
        stored = raw.get("collectives/reducer/0")
        assert len(stored) == len(b'{"host": "127.0.0.1", "port": 4000}') + SIGNATURE_BYTES
        assert signed.add("collectives/claim/0", 1) == 1 and signed.check(["collectives/reducer/0"])

        raw.set("collectives/reducer/0", b'{"host": "127.0.0.1", "port": 6666}')  # a stranger's relay
        with pytest.raises(AuthenticationError, match="'collectives/reducer/0'.*not signed with this process's secret"):
            signed.get("collectives/reducer/0")
        raw.set("collectives/reducer/1", stored)  # a genuine record, moved to another key
        with pytest.raises(AuthenticationError, match="'collectives/reducer/1'"):
            signed.get("collectives/reducer/1")
        raw.set("collectives/reducer/2", stored[:-1] + bytes([stored[-1] ^ 1]))
        with pytest.raises(AuthenticationError):
            signed.get("collectives/reducer/2")
        with pytest.raises(AuthenticationError):  # signed with another job's secret
            open_record(b"another job's secret", "collectives/reducer/0", stored)
    finally:
        signed.close()


def test_the_secret_stays_out_of_reprs_and_errors():
    record = sign_record(SECRET, "k", b"value")
    assert SECRET not in record
    with pytest.raises(AuthenticationError) as info:
        open_record(SECRET, "k", b"short")
    assert SECRET.decode() not in str(info.value)

    class Fake:
        def __repr__(self):
            return "Fake()"

    assert repr(SignedStore(Fake(), SECRET)) == "SignedStore(Fake())"


JOB_A, JOB_B = bytes(range(16)), bytes(range(1, 17))


@pytest.fixture
def second_server():
    srv = StoreServer("127.0.0.1", 0).start()
    yield srv
    srv.close()


@pytest.mark.parametrize("key, job_bound", [("collectives/job", False), ("collectives/abort", False),
                                            ("collectives/size", True), ("collectives/addr/1", True),
                                            ("collectives/reducer/0", True)])
def test_a_record_of_an_earlier_job_with_the_same_token_is_refused(server, second_server, key, job_bound):
    """Job A's store, then job B's (worker 0 serves a new one each job), one COLLECTIVES_TOKEN:
    a stranger copies A's genuine record into B's store."""
    earlier = signed_store(StoreClient("127.0.0.1", server.port, timeout=5), SECRET, JOB_A)
    raw = StoreClient("127.0.0.1", second_server.port, timeout=5)
    now = signed_store(raw, SECRET, JOB_B)
    try:
        earlier.set(key, b"A's record")
        assert earlier.get(key) == b"A's record"
        raw.set(key, earlier.store.get(key))  # replayed, bytes for bytes
        with pytest.raises(AuthenticationError, match=f"refused the record '{key}'.*not signed with this process's "
                                                      "secret for this job.*copied it there from an earlier job"):
            now.get(key)
        now.set(key, b"B's record")
        assert now.get(key) == b"B's record"
    finally:
        earlier.close()
        now.close()


def test_a_record_of_another_job_that_shares_the_store_is_refused_once_bound(server):
    """Two jobs in one store (as with a prefix): the records written before the job id is
    known are bound to the store alone; every other to the job id too."""
    raw = StoreClient("127.0.0.1", server.port, timeout=5)
    first, second = signed_store(raw, SECRET, JOB_A), signed_store(raw, SECRET)
    try:
        first.set("collectives/addr/1", b"A's address")
        first.set("collectives/job", JOB_A)
        assert second.get("collectives/job") == JOB_A  # readable before its reader knows the job
        second.bind(JOB_B)
        with pytest.raises(AuthenticationError, match="'collectives/addr/1'"):
            second.get("collectives/addr/1")
        second.bind(JOB_A)
        assert second.get("collectives/addr/1") == b"A's address"
    finally:
        raw.close()


def test_records_bind_to_the_context_given():
    record = sign_record(SECRET, "k", b"value", b"context")
    assert open_record(SECRET, "k", record, context=b"context") == b"value"
    for context in (b"", b"contexT"):
        with pytest.raises(AuthenticationError):
            open_record(SECRET, "k", record, context=context)
    with pytest.raises(AuthenticationError):  # no context is a context of its own
        open_record(SECRET, "k", sign_record(SECRET, "k", b"value"), context=b"context")


def test_a_store_without_a_nonce_binds_to_the_job_alone():
    """An adapter of torch.distributed's store has no nonce: records still bind to the job."""

    class Plain:
        def __init__(self):
            self.data = {}

        def set(self, key, value):
            self.data[key] = value

        def get(self, key, timeout=None):
            return self.data[key]

    plain = Plain()
    signed_store(plain, SECRET, JOB_A).set("collectives/addr/0", b"a")
    assert signed_store(plain, SECRET, JOB_A).get("collectives/addr/0") == b"a"
    with pytest.raises(AuthenticationError):
        signed_store(plain, SECRET, JOB_B).get("collectives/addr/0")
