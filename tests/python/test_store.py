"""The job's key-value store, over real sockets on 127.0.0.1."""

import socket
import struct
import threading
import time

import pytest

from collectives import _store
from collectives._store import MAX_VALUE_BYTES, StoreClient, StoreServer
from collectives.errors import CollectiveError, TimeoutError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    srv = StoreServer("127.0.0.1", 0).start()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    c = StoreClient("127.0.0.1", server.port, timeout=10)
    yield c
    c.close()


def _closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_set_get_add_check_wait(server, client):
    client.set("a", b"\x00\x01binary")
    assert client.get("a") == b"\x00\x01binary"
    client.set("a", b"replaced")
    assert client.get("a") == b"replaced"
    client.set("empty", b"")
    assert client.get("empty") == b""
    assert client.add("n", 5) == 5
    assert client.add("n", -2) == 3
    assert client.get("n") == b"3"
    assert client.check(["a", "n"])
    assert not client.check(["a", "absent"])
    client.wait(["a", "n"], timeout=1)
    other = StoreClient("127.0.0.1", server.port, timeout=5)
    try:
        assert other.get("a") == b"replaced"  # one store for every client
    finally:
        other.close()


def test_get_times_out_naming_the_key(client):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="'nowhere'"):
        client.get("nowhere", timeout=0.3)
    assert 0.25 < time.monotonic() - start < 3
    client.set("k", b"v")  # the connection is still usable after a timeout
    assert client.get("k", timeout=0) == b"v"


def test_wait_names_the_missing_keys(client):
    client.set("here", b"1")
    with pytest.raises(TimeoutError) as info:
        client.wait(["here", "gone1", "gone2"], timeout=0.2)
    assert "'gone1'" in str(info.value) and "'gone2'" in str(info.value) and "'here'" not in str(info.value)


def test_get_waits_for_a_set_from_another_client(server, client):
    def later():
        time.sleep(0.3)
        with_other = StoreClient("127.0.0.1", server.port, timeout=5)
        with_other.set("late", b"value")
        with_other.close()

    threading.Thread(target=later).start()
    start = time.monotonic()
    assert client.get("late", timeout=10) == b"value"
    assert time.monotonic() - start < 3  # woken by the set, not by its timeout


def test_client_waits_for_a_server_that_starts_later(reserve_port):
    port = reserve_port()
    servers = []

    def start_later():
        time.sleep(0.5)
        servers.append(StoreServer("127.0.0.1", port).start())

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        c = StoreClient("127.0.0.1", port, timeout=10)
        c.set("x", b"1")
        assert c.get("x") == b"1"
        c.close()
    finally:
        thread.join()
        for srv in servers:
            srv.close()


def test_client_gives_up_at_its_deadline(reserve_port):
    port = reserve_port()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        StoreClient("127.0.0.1", port, timeout=0.5)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("request_bytes", [
    struct.pack("!BHI", 1, 2, MAX_VALUE_BYTES + 1),  # a field longer than allowed
    struct.pack("!BH", 1, 60000),  # too many fields
    struct.pack("!BHI", 99, 1, 1) + b"k",  # unknown request
    struct.pack("!BHI", 2, 2, 1) + b"k" + struct.pack("!I", 3) + b"abc",  # GET whose timeout is not 8 bytes
    struct.pack("!BHI", 1, 2, 0) + struct.pack("!I", 1) + b"v",  # an empty key
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # a WAIT whose many allowed-size fields add up to more than one request may hold
    struct.pack("!BHQ", 4, 4097, 0)[:3] + struct.pack("!I", 8) + bytes(8)
    + (struct.pack("!I", MAX_VALUE_BYTES) + bytes(MAX_VALUE_BYTES)) * 2 + struct.pack("!I", MAX_VALUE_BYTES),
], ids=["oversize", "fields", "unknown-op", "bad-timeout", "empty-key", "http", "oversize-total"])
def test_a_bad_request_closes_only_its_connection(server, client, request_bytes):
    blocked = {}

    def wait_for_key():
        blocked["value"] = client.get("after", timeout=10)

    waiter = threading.Thread(target=wait_for_key)
    waiter.start()  # a client blocked in the server while the bad one comes and goes
    bad = socket.create_connection(("127.0.0.1", server.port))
    bad.sendall(request_bytes)
    assert _closed_by_peer(bad)
    bad.close()
    setter = StoreClient("127.0.0.1", server.port, timeout=5)
    setter.set("after", b"fine")
    waiter.join(timeout=10)
    assert blocked["value"] == b"fine"
    assert setter.add("count", 1) == 1
    setter.close()


def test_client_checks_sizes_and_types(client):
    with pytest.raises(ValueError, match="at most"):
        client.set("big", bytes(MAX_VALUE_BYTES + 1))
    with pytest.raises(TypeError):
        client.set("s", "not bytes")
    with pytest.raises(ValueError):
        client.get("")
    client.set("big", bytes(MAX_VALUE_BYTES))  # the bound itself is fine
    assert len(client.get("big")) == MAX_VALUE_BYTES


@pytest.mark.parametrize("value", [b"abc", b" 7", b"7\n", b"1_000", b"+5", b"0x10", b"", b"9223372036854775808",
                                   b"-9223372036854775809", b"12345678901234567890"])
def test_add_to_a_value_that_is_no_signed_64_bit_decimal(client, value):
    client.set("text", value)
    with pytest.raises(CollectiveError, match="refused a request on key 'text': the value of this key is not a signed "
                                              "64-bit integer in decimal"):
        client.add("text", 1)
    assert client.get("text") == value


def test_counters_are_signed_64_bit_as_c10d_s(client):
    """c10d's Store.add takes an int64 and may go below zero; so do ours, and a sum beyond the
    range is refused, naming it, with the counter left as it was."""
    top, bottom = (1 << 63) - 1, -(1 << 63)
    assert client.add("n", -3) == -3 and client.get("n") == b"-3"
    assert client.add("n", 5) == 2
    assert client.add("max", top) == top and client.add("max", 0) == top
    with pytest.raises(CollectiveError, match="adding 1 to 9223372036854775807 leaves the signed 64-bit range; "
                                              "the counter is unchanged"):
        client.add("max", 1)
    assert client.get("max") == str(top).encode() and client.add("max", -top) == 0
    assert client.add("min", bottom) == bottom
    with pytest.raises(CollectiveError, match="adding -1 to -9223372036854775808 leaves the signed 64-bit range"):
        client.add("min", -1)
    assert client.add("min", top) == -1
    client.set("set", str(bottom).encode())  # a counter written by SET, as c10d's users do
    assert client.add("set", 1) == bottom + 1


@pytest.mark.parametrize("amount, error", [(1 << 63, ValueError), (-(1 << 63) - 1, ValueError), (1.0, TypeError),
                                           (True, TypeError), ("1", TypeError), (None, TypeError)])
def test_an_amount_that_is_no_signed_64_bit_int_is_refused_before_it_is_sent(client, amount, error):
    with pytest.raises(error, match="store counter adds"):
        client.add("n", amount)
    assert not client.check(["n"])  # nothing was sent
    assert client.add("n", 1) == 1  # and the connection still serves


def test_the_store_s_nonce_is_its_own_and_read_only(server, client):
    nonce = client.nonce()
    assert nonce == server.nonce and len(nonce) == _store.NONCE_BYTES
    assert client.get(_store.NONCE_KEY) == nonce
    for write in (lambda: client.set(_store.NONCE_KEY, bytes(16)), lambda: client.add(_store.NONCE_KEY, 1)):
        with pytest.raises(CollectiveError, match="holds the store's nonce: no client may write it"):
            write()
    assert client.get(_store.NONCE_KEY) == nonce
    other = StoreServer("127.0.0.1", 0)  # another store (another job's): another nonce
    try:
        assert other.nonce != server.nonce
    finally:
        other.close()


def test_the_store_is_bounded(server, client, monkeypatch):
    monkeypatch.setattr(_store, "MAX_STORE_BYTES", 1000)
    client.set("a", bytes(900))
    with pytest.raises(CollectiveError, match="full"):
        client.set("b", bytes(200))
    client.set("a", bytes(10))  # replacing frees the old value's room
    client.set("b", bytes(200))


def test_connections_are_bounded():
    """A newcomer beyond the bound takes the place of the connection that waited longest
    (here the idle client's, which reconnects for its next request)."""
    srv = StoreServer("127.0.0.1", 0, max_connections=2).start()
    try:
        idle = StoreClient("127.0.0.1", srv.port, timeout=5)
        busy = StoreClient("127.0.0.1", srv.port, timeout=5)
        busy.set("k", b"v")
        extra = socket.create_connection(("127.0.0.1", srv.port))
        extra.sendall(struct.pack("!BH", 4, 1) + struct.pack("!IQ", 8, 0))  # WAIT for nothing: OK
        extra.settimeout(5)
        assert extra.recv(3) == struct.pack("!BH", 0, 0)
        assert busy.get("k") == b"v"
        assert idle.get("k") == b"v"
        extra.close()
        idle.close()
        busy.close()
    finally:
        srv.close()


def test_closing_the_server_wakes_blocked_clients():
    srv = StoreServer("127.0.0.1", 0).start()
    c = StoreClient("127.0.0.1", srv.port, timeout=30)
    errors = []

    def blocked_get():
        try:
            c.get("never", timeout=30)
        except CollectiveError as e:
            errors.append(e)

    thread = threading.Thread(target=blocked_get)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    srv.close()
    thread.join(timeout=5)
    assert time.monotonic() - start < 3
    assert errors and "lost the connection" in str(errors[0])
    with pytest.raises(CollectiveError):
        c.set("k", b"v")
    c.close()


def test_close_with_linger_lets_clients_read_then_returns():
    srv = StoreServer("127.0.0.1", 0).start()
    c = StoreClient("127.0.0.1", srv.port, timeout=5)
    c.set("notice", b"bye")

    def read_then_leave():
        time.sleep(0.3)
        assert c.get("notice") == b"bye"
        c.close()

    thread = threading.Thread(target=read_then_leave)
    thread.start()
    start = time.monotonic()
    srv.close(linger=10)
    assert time.monotonic() - start < 5  # returned when the client left, not after 10 s
    thread.join()


def test_address_in_use_is_a_clear_error(server):
    with pytest.raises(CollectiveError, match=f"127.0.0.1:{server.port}"):
        StoreServer("127.0.0.1", server.port)
