"""The job's small key-value store: served by worker 0, used at start-up to meet.

Wire format (big-endian), one request and one reply at a time per connection:

    message = code:u8  nfields:u16  { length:u32  bytes }*nfields

Requests: SET [key, value], GET [key, timeout_ms:u64], ADD [key, delta:i64],
WAIT [timeout_ms:u64, key...]. ADD keeps a signed 64-bit counter (as c10d's ``add``: it
may go below zero) in the key's value, written in decimal; a sum beyond the signed 64-bit
range, or a value that is not such a number, is refused with an ERROR and leaves the key
as it was. Replies: OK, TIMEOUT or ERROR with their fields; or
GOODBYE [reason], sent unasked to a connection that the server closes while it is idle
(the client then reconnects for its next request).
GET and WAIT block in the server (on a condition variable, never by polling) until the
keys exist or the timeout passes. Sizes are bounded; a connection that sends a malformed
or oversize request is closed without disturbing the others.

Strangers who can reach the port cannot lock the store or exhaust its host: a request must
arrive whole within MESSAGE_TIMEOUT_S of its first byte, a connection idle for
IDLE_TIMEOUT_S is closed, the bytes of requests being read are bounded per connection and
in all, and a newcomer beyond MAX_CONNECTIONS (or when the process is out of file
descriptors) takes the place of the connection that has waited longest, the job's
processes being busy ones. The store holds no secret: anyone who can reach it can read
it and write to it, so the job's processes sign what they publish (sign_record).

A signature binds a record to its key and to a context (:class:`SignedStore`): the store's
nonce, 16 random bytes that the server makes when it starts and serves, read-only, at
NONCE_KEY (a fresh store, a fresh nonce: each job's worker 0 serves its own), and, for the
records written once the job id is known, the job id. So a record signed for an earlier job
with the same token, copied into this job's store by whoever can write to it, is refused:
its nonce (and its job id) are another job's. A store that has no nonce (torch.distributed's,
through the torch backend's adapter) binds the records to the job id alone: there the job's
first record (its id) and failure notices written before it is known could be replayed from
an earlier job that used the same COLLECTIVES_TOKEN, which makes the start fail, never a
wrong result (the handshakes are bound to the job id and the secret).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import resource
import secrets
import socket
import struct
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _netif
from .errors import AuthenticationError, CollectiveError, TimeoutError

__all__ = ["StoreServer", "StoreClient", "SignedStore", "sign_record", "open_record", "MAX_KEY_BYTES",
           "MAX_VALUE_BYTES", "SIGNATURE_BYTES", "NONCE_KEY", "NONCE_BYTES"]

log = logging.getLogger("collectives")

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1 << 20
MAX_FIELDS = 4096  # keys in one WAIT
MAX_STORE_BYTES = 64 << 20  # all keys and values together
MAX_CONNECTIONS = 4096
# One request's fields together: a SET of the largest value, or a WAIT on many keys. The
# server reads at most this much before it acts, so a stranger cannot make it allocate more.
MAX_MESSAGE_BYTES = 2 * MAX_VALUE_BYTES
# Once a request has begun, the rest of it must arrive within this long (the whole
# request, not each read, so that trickling bytes does not keep it open); a reply must be
# taken within this long too.
MESSAGE_TIMEOUT_S = 30.0
# A connection with no request under way for this long is closed (with a GOODBYE, so that
# a client of the job reconnects when it next needs the store).
IDLE_TIMEOUT_S = 60.0
# The bytes of requests being read: this much of each request is free, beyond it they
# come out of one budget shared by all connections, so that many large requests sent
# slowly cannot make the server hold MAX_MESSAGE_BYTES per connection. The job's own
# requests are far below the free part.
FREE_REQUEST_BYTES = 16 << 10
MAX_REQUEST_BYTES_IN_FLIGHT = 64 << 20
_RECV_CHUNK = 64 << 10  # bytes are allocated as they arrive, never ahead for a length announced

_SET, _GET, _ADD, _WAIT = 1, 2, 3, 4
_OK, _TIMEOUT, _ERROR, _GOODBYE = 0, 1, 2, 3
_HEADER = struct.Struct("!BH")
_LENGTH = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_COUNTER = re.compile(rb"-?[0-9]{1,19}")  # what ADD takes as a key's value: a decimal int64
# The store's own key: its nonce, made by the server and read-only to every client.
NONCE_KEY = "collectives-store/nonce"
NONCE_BYTES = 16
_NONCE_KEY = NONCE_KEY.encode()
_MAX_WAIT_S = 7 * 24 * 3600.0  # beyond any job's timeout; keeps Condition.wait in range
# A blocked GET is answered by the server when its own timeout passes; the client waits
# this much longer for that answer before it calls the server unresponsive.
_REPLY_GRACE_S = 10.0
# A client whose idle connection the server closed connects again within this long.
_RECONNECT_S = 10.0


class _Malformed(Exception):
    """A request that breaks the protocol: its connection is closed."""


def _pack(code: int, fields: Sequence[bytes]) -> bytes:
    return b"".join(_parts(code, fields))


def _parts(code: int, fields: Sequence[bytes]) -> List[bytes]:
    parts = [_HEADER.pack(code, len(fields))]
    for field in fields:
        parts.append(_LENGTH.pack(len(field)))
        parts.append(field)
    return parts


def _send_message(sock: socket.socket, code: int, fields: Sequence[bytes]) -> None:
    """Sends large fields as they are, so that a value read by many is never copied per reader."""
    small: List[bytes] = []
    for part in _parts(code, fields):
        if len(part) < _RECV_CHUNK:
            small.append(part)
            continue
        sock.sendall(b"".join(small))
        small = []
        sock.sendall(part)
    sock.sendall(b"".join(small))


class _Reader:
    """Reads one message by a deadline (None: none), holding only the bytes that arrived;
    ``budget`` (the server's) pays for them."""

    def __init__(self, sock: socket.socket, deadline: Optional[float], budget: Optional["_Budget"] = None):
        self.sock, self.deadline, self.budget = sock, deadline, budget
        self.taken = 0  # bytes received beyond FREE_REQUEST_BYTES, paid by the budget
        self.received = 0

    def exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("the message's deadline passed")
                self.sock.settimeout(remaining)
            chunk = self.sock.recv(min(n - len(buf), _RECV_CHUNK))
            if not chunk:
                raise EOFError("connection closed")
            self._pay(len(chunk))
            buf += chunk
        return bytes(buf)

    def _pay(self, count: int) -> None:
        self.received += count
        due = max(0, self.received - FREE_REQUEST_BYTES) - self.taken
        if due and self.budget is not None:
            self.budget.take(due)
            self.taken += due

    def release(self) -> None:
        if self.budget is not None and self.taken:
            self.budget.give_back(self.taken)
            self.taken = 0

    def message(self, max_field_bytes: int) -> Tuple[int, List[bytes]]:
        code, nfields = _HEADER.unpack(self.exact(_HEADER.size))
        if nfields > MAX_FIELDS + 1:
            raise _Malformed(f"{nfields} fields (at most {MAX_FIELDS + 1})")
        fields = []
        total = 0
        for _ in range(nfields):
            (length,) = _LENGTH.unpack(self.exact(_LENGTH.size))
            total += length
            if length > max_field_bytes or total > MAX_MESSAGE_BYTES:
                raise _Malformed(f"a field of {length} bytes (at most {max_field_bytes}, and "
                                 f"{MAX_MESSAGE_BYTES} in one request)")
            fields.append(self.exact(length))
        return code, fields


class _Budget:
    """The bytes that the server may hold for requests being read, all connections together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        with self._lock:
            if self.used + count > self.limit:
                raise _Malformed(f"requests being read hold {self.used} bytes already (at most {self.limit}); "
                                 "large requests sent slowly by many connections")
            self.used += count

    def give_back(self, count: int) -> None:
        with self._lock:
            self.used -= count


class _Connection:
    """A client's connection as the server sees it."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        self.since = time.monotonic()  # when it last began a request, or began to idle
        self.idle = True
        self.served = False  # it has sent a whole request: a client's, not an idle stranger's
        self.evicted = False  # guarded by the server's _cond; wakes its GET/WAIT

    def mark(self, idle: bool) -> None:
        self.since, self.idle = time.monotonic(), idle


def _timeout_field(seconds: float) -> bytes:
    return _U64.pack(int(max(0.0, min(seconds, _MAX_WAIT_S)) * 1000))


def _open_file_limit() -> int:
    """This process's open-file limit, raised first to the hard limit (as servers do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class StoreServer:
    """Serves the store from background threads: ``StoreServer(host, port).start()``.

    Binds at construction, so that an address in use fails at once; port 0 picks a free
    port (read it from ``.port``). Host "" or "0.0.0.0" serves on every interface.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = MAX_CONNECTIONS):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # A long queue: under a flood of connections, a short one drops the SYNs of the
            # job's own (they retry only a second later) before the accept loop can evict.
            self._listener = socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
        except OSError as e:
            raise CollectiveError(f"cannot serve the collectives store on {host}:{port}: {e.strerror or e}; "
                                  "choose another port, or stop the process that holds it") from e
        self._listener.setblocking(False)
        self.host = host
        self.port = self._listener.getsockname()[1]
        # Strangers' connections must never take the fds this process needs for the job's
        # own sockets: at most half of what it may open.
        self._max_connections = min(max_connections, _open_file_limit() // 2)
        self.nonce = secrets.token_bytes(NONCE_BYTES)  # binds the records signed here to this store
        self._data: dict = {_NONCE_KEY: self.nonce}
        self._bytes = len(_NONCE_KEY) + NONCE_BYTES
        self._cond = threading.Condition()
        self._conns: Dict[socket.socket, _Connection] = {}  # guarded by _cond
        self._evicting = False  # guarded by _cond: said once in the log per crowd of connections
        self._budget = _Budget(MAX_REQUEST_BYTES_IN_FLIGHT)
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "StoreServer":
        self._thread = threading.Thread(target=self._accept_loop, name="collectives-store", daemon=True)
        self._thread.start()
        log.debug("store: serving on %s:%d", self.host, self.port)
        return self

    def close(self, linger: float = 0.0) -> None:
        """Stop serving; idempotent. First waits up to ``linger`` seconds for clients to
        disconnect, so that they can still read what was set last (e.g. an abort notice)."""
        with self._cond:
            if self._closed:
                return
            if linger > 0:
                self._cond.wait_for(lambda: not self._conns, linger)
            self._closed = True
            conns = list(self._conns)
            self._cond.notify_all()  # wakes blocked GET/WAIT handlers, which then exit
        self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join()
        for conn in conns:
            _shut(conn)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        for conn, addr in _netif.accepted(self._listener, self._wake_r, f"store on port {self.port}",
                                          self._make_room):
            connection = _Connection(conn, f"{addr[0]}:{addr[1]}")
            with self._cond:
                if self._closed:
                    conn.close()
                    continue
                if len(self._conns) >= self._max_connections:
                    self._evict_longest_waiting(f"{self._max_connections} connections are open")
                self._conns[conn] = connection
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(connection,),
                             name="collectives-store-conn", daemon=True).start()

    def _make_room(self) -> None:
        """Out of file descriptors: frees one for the connection that waits to be accepted."""
        with self._cond:
            if self._conns:
                self._evict_longest_waiting("this process is out of file descriptors")

    def _evict_longest_waiting(self, why: str) -> None:
        """With _cond held: closes a connection that has never made a whole request if there
        is one, else the one that began its request, or its idleness, longest ago. The job's
        processes make requests from the start (a long GET among them), so the victim is a
        stranger's, unless strangers make requests and outpace them."""
        victim = min(self._conns.values(), key=lambda c: (c.served, c.since))
        if not self._evicting:
            log.warning("store: %s: closing the longest-waiting connection for each newcomer (first %s)",
                        why, victim.peer)
        self._evicting = True
        del self._conns[victim.sock]
        victim.evicted = True
        self._cond.notify_all()  # wakes it if it waits in a GET or WAIT
        if victim.idle:
            _say_goodbye(victim.sock, f"closed for a newcomer: {why}")
        _shut(victim.sock)  # its thread wakes, and closes it

    def _serve_connection(self, connection: _Connection) -> None:
        conn = connection.sock
        try:
            while self._next_request(connection):
                reader = _Reader(conn, time.monotonic() + MESSAGE_TIMEOUT_S, self._budget)
                try:
                    op, fields = reader.message(MAX_VALUE_BYTES)
                    with self._cond:  # from now on, not an idle stranger's: evicted after those
                        connection.served = True
                    code, reply = self._execute(op, fields, connection)
                except EOFError:
                    return
                except socket.timeout:
                    raise _Malformed(f"a request did not arrive whole within {MESSAGE_TIMEOUT_S:g} s") from None
                finally:
                    reader.release()
                conn.settimeout(MESSAGE_TIMEOUT_S)  # a client that does not read its reply is dropped
                _send_message(conn, code, reply)
                with self._cond:
                    connection.mark(idle=True)
        except _Malformed as e:
            log.warning("store: closing the connection from %s: %s", connection.peer, e)
        except OSError:
            pass  # the client went away, or close() or an eviction shut the connection
        finally:
            with self._cond:
                if self._conns.get(conn) is connection:
                    del self._conns[conn]
                if not self._conns:
                    self._evicting = False
                self._cond.notify_all()  # close(linger) waits for connections to go
            conn.close()

    def _next_request(self, connection: _Connection) -> bool:
        """Waits, up to IDLE_TIMEOUT_S, for the next request; whether one began."""
        conn = connection.sock
        conn.settimeout(IDLE_TIMEOUT_S)
        try:
            if not conn.recv(1, socket.MSG_PEEK):
                return False
        except socket.timeout:
            with self._cond:
                if connection.evicted:
                    return False
                connection.evicted = True
            log.debug("store: closing the connection from %s: idle for %g s", connection.peer, IDLE_TIMEOUT_S)
            _say_goodbye(conn, f"idle for {IDLE_TIMEOUT_S:g} s")
            return False
        with self._cond:
            if connection.evicted:
                return False
            connection.mark(idle=False)
        return True

    def _execute(self, op: int, fields: List[bytes], connection: _Connection) -> Tuple[int, List[bytes]]:
        if op in (_SET, _ADD) and len(fields) == 2 and fields[0] == _NONCE_KEY:
            return _ERROR, [b"this key holds the store's nonce: no client may write it"]
        if op == _SET and len(fields) == 2:
            key, value = fields
            self._check_key(key)
            with self._cond:
                grown = self._bytes + len(key) + len(value) - self._entry_bytes(key)
                if grown > MAX_STORE_BYTES:
                    return _ERROR, [b"the store is full (%d bytes)" % MAX_STORE_BYTES]
                self._data[key] = value
                self._bytes = grown
                self._cond.notify_all()
            return _OK, []
        if op == _GET and len(fields) == 2:
            key = fields[0]
            self._check_key(key)
            with self._cond:
                self._wait_for([key], self._timeout(fields[1]), connection)
                if key in self._data:
                    return _OK, [self._data[key]]
            return _TIMEOUT, []
        if op == _ADD and len(fields) == 2:
            key = fields[0]
            self._check_key(key)
            if len(fields[1]) != _I64.size:
                raise _Malformed("ADD without an 8-byte amount")
            (amount,) = _I64.unpack(fields[1])
            with self._cond:
                current = self._data.get(key, b"0")
                if not _COUNTER.fullmatch(current) or not _I64_MIN <= int(current) <= _I64_MAX:
                    return _ERROR, [b"the value of this key is not a signed 64-bit integer in decimal"]
                total = int(current) + amount
                if not _I64_MIN <= total <= _I64_MAX:  # the reply could not carry it
                    return _ERROR, [b"adding %d to %d leaves the signed 64-bit range; the counter is unchanged"
                                    % (amount, int(current))]
                value = str(total).encode()
                grown = self._bytes + len(key) + len(value) - self._entry_bytes(key)
                if grown > MAX_STORE_BYTES:
                    return _ERROR, [b"the store is full (%d bytes)" % MAX_STORE_BYTES]
                self._bytes = grown
                self._data[key] = value
                self._cond.notify_all()
            return _OK, [_I64.pack(total)]
        if op == _WAIT and 1 <= len(fields) <= MAX_FIELDS + 1:
            keys = fields[1:]
            for key in keys:
                self._check_key(key)
            with self._cond:
                self._wait_for(keys, self._timeout(fields[0]), connection)
                missing = [key for key in keys if key not in self._data]
            return (_TIMEOUT, missing) if missing else (_OK, [])
        raise _Malformed(f"unknown request {op} with {len(fields)} fields")

    def _wait_for(self, keys: List[bytes], timeout: float, connection: _Connection) -> None:
        """With _cond held: until every key exists, the timeout passes, close(), or the
        connection is evicted."""
        self._cond.wait_for(lambda: self._closed or connection.evicted or all(k in self._data for k in keys),
                            timeout)
        if self._closed or connection.evicted:
            raise OSError("store closed, or the connection evicted")

    def _entry_bytes(self, key: bytes) -> int:
        return len(key) + len(self._data[key]) if key in self._data else 0

    @staticmethod
    def _check_key(key: bytes) -> None:
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise _Malformed(f"a key of {len(key)} bytes (1 to {MAX_KEY_BYTES})")

    @staticmethod
    def _timeout(field: bytes) -> float:
        if len(field) != _U64.size:
            raise _Malformed("a timeout that is not 8 bytes")
        return min(_U64.unpack(field)[0] / 1000.0, _MAX_WAIT_S)


def _shut(conn: socket.socket) -> None:
    try:
        # shutdown, unlike close, wakes a handler thread blocked in recv
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _say_goodbye(conn: socket.socket, reason: str) -> None:
    """Tells an idle client that the server closes its connection, so that it reconnects."""
    try:
        conn.send(_pack(_GOODBYE, [reason.encode()]), socket.MSG_DONTWAIT)
    except OSError:
        pass


class StoreClient:
    """A connection to the store. Connects at construction, retrying until ``timeout``
    seconds have passed (the server may start later); ``timeout`` is also the default
    wait of :meth:`get` and :meth:`wait`. Safe to share between threads (calls queue)."""

    def __init__(self, host: str, port: int, timeout: float = 300.0):
        self.address = f"{host}:{port}"
        self.timeout = timeout
        self._host, self._port = host, port
        self._nonce: Optional[bytes] = None
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = self._connect(host, port, time.monotonic() + timeout)

    def _connect(self, host: str, port: int, deadline: float) -> socket.socket:
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = socket.create_connection((host, port), timeout=max(0.01, min(remaining, 5.0)))
            except OSError as e:  # refused (not up yet), unreachable, name not resolvable yet
                if remaining <= delay:
                    raise TimeoutError(
                        f"could not reach the collectives store at {self.address} within {self.timeout:g} s "
                        f"({e.strerror or e}): is worker 0, which serves it, running, and is "
                        f"{self.address} the address of its host?") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.debug("store: connected to %s", self.address)
            return sock

    def set(self, key: str, value: bytes) -> None:
        """Sets ``key`` to ``value`` (bytes, at most MAX_VALUE_BYTES), waking its waiters."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"store values are bytes, not {type(value).__name__}")
        if len(value) > MAX_VALUE_BYTES:
            raise ValueError(f"a store value holds at most {MAX_VALUE_BYTES} bytes, not {len(value)}")
        code, fields = self._call(_SET, [self._key(key), bytes(value)], 0.0)
        self._check_error(code, fields, key)

    def get(self, key: str, timeout: Optional[float] = None) -> bytes:
        """The value of ``key``; waits until it is set, or raises TimeoutError."""
        timeout = self.timeout if timeout is None else timeout
        code, fields = self._call(_GET, [self._key(key), _timeout_field(timeout)], timeout)
        if code == _TIMEOUT:
            raise TimeoutError(f"key {key!r} did not appear in the store at {self.address} within {timeout:g} s")
        self._check_error(code, fields, key)
        return fields[0]

    def add(self, key: str, amount: int) -> int:
        """Adds ``amount`` (a signed 64-bit integer; it may be negative) to the counter at
        ``key`` (0 if unset) and returns the sum. TypeError or ValueError before anything is
        sent for an amount that is no such integer; CollectiveError if the sum would leave the
        signed 64-bit range (the counter is left as it was)."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"a store counter adds an int, not {type(amount).__name__}")
        if not _I64_MIN <= amount <= _I64_MAX:
            raise ValueError(f"a store counter adds a signed 64-bit integer ({_I64_MIN} to {_I64_MAX}), not {amount}")
        code, fields = self._call(_ADD, [self._key(key), _I64.pack(amount)], 0.0)
        self._check_error(code, fields, key)
        return _I64.unpack(fields[0])[0]

    def nonce(self) -> bytes:
        """The store's nonce (see the module's docstring), read once."""
        if self._nonce is None:
            try:
                self._nonce = self.get(NONCE_KEY, 0.0)
            except TimeoutError:
                raise CollectiveError(f"the store at {self.address} has no nonce: it is not a collectives store of "
                                      "this version") from None
        return self._nonce

    def check(self, keys: Iterable[str]) -> bool:
        """Whether every key is set now (does not wait)."""
        code, _ = self._call(_WAIT, [_timeout_field(0.0)] + [self._key(k) for k in keys], 0.0)
        return code == _OK

    def wait(self, keys: Iterable[str], timeout: Optional[float] = None) -> None:
        """Waits until every key is set, or raises TimeoutError naming those that are not."""
        timeout = self.timeout if timeout is None else timeout
        code, fields = self._call(_WAIT, [_timeout_field(timeout)] + [self._key(k) for k in keys], timeout)
        if code == _TIMEOUT:
            missing = ", ".join(repr(k.decode(errors="replace")) for k in fields)
            raise TimeoutError(f"keys {missing} did not appear in the store at {self.address} within {timeout:g} s")
        self._check_error(code, fields, "")

    def close(self) -> None:
        """Closes the connection; idempotent. A call blocked in another thread fails."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _call(self, op: int, fields: List[bytes], wait_s: float) -> Tuple[int, List[bytes]]:
        with self._lock:
            code, reply = self._exchange(self._open_socket(), op, fields, wait_s)
            if code == _GOODBYE:  # it closed us as idle just as we asked: it did not act on it
                self._reconnect()
                code, reply = self._exchange(self._open_socket(), op, fields, wait_s)
            return code, reply

    def _open_socket(self) -> socket.socket:
        """With _lock held: the connection, made anew if the server closed it as idle."""
        if self._sock is None:
            raise CollectiveError(f"the connection to the store at {self.address} is closed")
        try:
            self._sock.settimeout(0.0)  # a socket with a timeout would wait for the peek
            said = self._sock.recv(_HEADER.size, socket.MSG_PEEK)
        except BlockingIOError:
            said = None  # nothing: the usual case
        except OSError:
            said = None  # reset: the exchange fails and says so
        if said and said[0] == _GOODBYE:
            self._reconnect()
        return self._sock

    def _reconnect(self) -> None:
        self.close()
        log.debug("store: the server at %s closed our idle connection; connecting again", self.address)
        self._sock = self._connect(self._host, self._port, time.monotonic() + _RECONNECT_S)

    def _exchange(self, sock: socket.socket, op: int, fields: List[bytes], wait_s: float) -> Tuple[int, List[bytes]]:
        """With _lock held: one request and its reply."""
        try:
            sock.settimeout(wait_s + _REPLY_GRACE_S)
            sock.sendall(_pack(op, fields))
            return _Reader(sock, time.monotonic() + wait_s + _REPLY_GRACE_S).message(MAX_VALUE_BYTES)
        except socket.timeout:
            self.close()  # a late reply would be taken for the next request's
            raise TimeoutError(f"the store at {self.address} did not answer within "
                               f"{wait_s + _REPLY_GRACE_S:g} s") from None
        except (OSError, EOFError, _Malformed) as e:
            self.close()
            raise CollectiveError(f"lost the connection to the store at {self.address} ({e}): "
                                  "worker 0, which serves it, has probably exited; see its log") from None

    def _check_error(self, code: int, fields: List[bytes], key: str) -> None:
        if code == _ERROR:
            reason = fields[0].decode(errors="replace") if fields else "unknown error"
            raise CollectiveError(f"the store at {self.address} refused a request on key {key!r}: {reason}")
        if code != _OK:
            self.close()
            raise CollectiveError(f"the store at {self.address} sent an unexpected reply {code}")

    @staticmethod
    def _key(key: str) -> bytes:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        data = key.encode()
        if not 0 < len(data) <= MAX_KEY_BYTES:
            raise ValueError(f"a store key has 1 to {MAX_KEY_BYTES} bytes, not {len(data)}")
        return data


SIGNATURE_BYTES = 32  # HMAC-SHA256, after the value
# No other MAC of the job's secret covers such bytes. v2: the context (store nonce, job id) too.
_RECORD_LABEL = b"collectives-store-record|v2|"
_KEY_LENGTH = struct.Struct("!H")


def _record_mac(secret: bytes, key: str, value: bytes, context: bytes) -> bytes:
    encoded = key.encode()
    return hmac.new(secret, _RECORD_LABEL + _KEY_LENGTH.pack(len(context)) + context + _KEY_LENGTH.pack(len(encoded))
                    + encoded + bytes(value), hashlib.sha256).digest()


def sign_record(secret: bytes, key: str, value: bytes, context: bytes = b"") -> bytes:
    """``value`` followed by its signature with the job's ``secret``, bound to ``key`` and to
    ``context`` (the store's nonce and the job id: :meth:`SignedStore.context`), so that a
    record can be neither forged, nor moved to another key, nor replayed into another job's
    store by whoever can write to the store without the secret."""
    return bytes(value) + _record_mac(secret, key, value, context)


def open_record(secret: bytes, key: str, record: bytes, where: str = "the store", writer: str = "",
                context: bytes = b"") -> bytes:
    """The value of a record made by :func:`sign_record`; AuthenticationError naming
    ``key`` (and ``writer``, the process that should have written it) if it was not signed
    with ``secret`` for that key and ``context``."""
    value, signature = record[:-SIGNATURE_BYTES], record[-SIGNATURE_BYTES:]
    if len(record) < SIGNATURE_BYTES or not hmac.compare_digest(signature, _record_mac(secret, key, value, context)):
        raise AuthenticationError(
            f"refused the record {key!r} in {where}{f' (written by {writer})' if writer else ''}: it is not signed "
            "with this process's secret for this job: the two were started with different COLLECTIVES_TOKEN values "
            "(give every worker and reducer the same), or a stranger who can reach the store wrote it, or copied "
            "it there from an earlier job")
    return value


class SignedStore:
    """A store (a :class:`StoreClient`, or any object with its methods) whose ``set``
    signs each value with the job's secret and whose ``get`` checks it (see
    :func:`open_record`), bound to the store's nonce (where the store has one: ``nonce()``)
    and, for the keys that ``job_bound(key)`` names, to the job id once :meth:`bind` gives
    it. ``add`` and ``check`` pass through: counters cannot be signed."""

    def __init__(self, store, secret: bytes, writer: Callable[[str], str] = lambda key: "",
                 job_bound: Callable[[str], bool] = lambda key: True, job_id: Optional[bytes] = None):
        """``writer(key)`` names the process that writes ``key``, for the refusal's message;
        ``job_bound(key)``: whether the record at ``key`` is written and read only by
        processes that know the job id (the others are bound to the store's nonce alone)."""
        self.store = store
        self._secret = secret  # never in a repr or a message
        self._writer = writer
        self._job_bound = job_bound
        self._job_id = job_id or b""
        self._nonce: Optional[bytes] = None
        self._where = f"the store at {store.address}" if hasattr(store, "address") else "the store"

    def __repr__(self) -> str:
        return f"SignedStore({self.store!r})"

    def bind(self, job_id: bytes) -> None:
        """From now on, the records of job-bound keys are signed and checked with ``job_id``."""
        self._job_id = bytes(job_id)

    def context(self, key: str) -> bytes:
        """What a record at ``key`` is bound to besides the key: the store's nonce, and the
        job id for a job-bound key once known (each with its length)."""
        if self._nonce is None:
            nonce = getattr(self.store, "nonce", None)
            self._nonce = nonce() if nonce is not None else b""
        job = self._job_id if self._job_bound(key) else b""
        return _KEY_LENGTH.pack(len(self._nonce)) + self._nonce + _KEY_LENGTH.pack(len(job)) + job

    def set(self, key: str, value: bytes) -> None:
        self.store.set(key, sign_record(self._secret, key, value, self.context(key)))

    def get(self, key: str, timeout: Optional[float] = None) -> bytes:
        context = self.context(key)
        record = self.store.get(key) if timeout is None else self.store.get(key, timeout)
        return open_record(self._secret, key, record, self._where, self._writer(key), context)

    def unverified(self, key: str) -> bytes:
        """The value of a record that get() refused, without any check: only to say whom
        it claims to come from, never to act on."""
        return self.store.get(key, 0.0)[:-SIGNATURE_BYTES]

    def add(self, key: str, amount: int) -> int:
        return self.store.add(key, amount)

    def check(self, keys: Iterable[str]) -> bool:
        return self.store.check(keys)

    def close(self) -> None:
        self.store.close()
