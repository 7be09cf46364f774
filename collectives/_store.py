"""The job's small key-value store: served by worker 0, used at start-up to meet.

Wire format (big-endian), one request and one reply at a time per connection:

    message = code:u8  nfields:u16  { length:u32  bytes }*nfields

Requests: SET [key, value], GET [key, timeout_ms:u64], ADD [key, delta:i64],
WAIT [timeout_ms:u64, key...]. Replies: OK, TIMEOUT or ERROR with their fields.
GET and WAIT block in the server (on a condition variable, never by polling) until the
keys exist or the timeout passes. Sizes are bounded; a connection that sends a malformed
or oversize request is closed without disturbing the others. The store holds no secret:
anyone who can reach it can read it.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Iterable, List, Optional, Sequence, Tuple

from . import _netif
from .errors import CollectiveError, TimeoutError

__all__ = ["StoreServer", "StoreClient", "MAX_KEY_BYTES", "MAX_VALUE_BYTES"]

log = logging.getLogger("collectives")

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1 << 20
MAX_FIELDS = 4096  # keys in one WAIT
MAX_STORE_BYTES = 64 << 20  # all keys and values together
MAX_CONNECTIONS = 4096
# One request's fields together: a SET of the largest value, or a WAIT on many keys. The
# server reads at most this much before it acts, so a stranger cannot make it allocate more.
MAX_MESSAGE_BYTES = 2 * MAX_VALUE_BYTES
# Once a request has begun, the rest of it must arrive within this long.
MESSAGE_TIMEOUT_S = 30.0

_SET, _GET, _ADD, _WAIT = 1, 2, 3, 4
_OK, _TIMEOUT, _ERROR = 0, 1, 2
_HEADER = struct.Struct("!BH")
_LENGTH = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_MAX_WAIT_S = 7 * 24 * 3600.0  # beyond any job's timeout; keeps Condition.wait in range
# A blocked GET is answered by the server when its own timeout passes; the client waits
# this much longer for that answer before it calls the server unresponsive.
_REPLY_GRACE_S = 10.0


class _Malformed(Exception):
    """A request that breaks the protocol: its connection is closed."""


def _pack(code: int, fields: Sequence[bytes]) -> bytes:
    parts = [_HEADER.pack(code, len(fields))]
    for field in fields:
        parts.append(_LENGTH.pack(len(field)))
        parts.append(bytes(field))
    return b"".join(parts)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        if count == 0:
            raise EOFError("connection closed")
        got += count
    return bytes(buf)


def _read_message(sock: socket.socket, max_field_bytes: int) -> Tuple[int, List[bytes]]:
    code, nfields = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if nfields > MAX_FIELDS + 1:
        raise _Malformed(f"{nfields} fields (at most {MAX_FIELDS + 1})")
    fields = []
    total = 0
    for _ in range(nfields):
        (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
        total += length
        if length > max_field_bytes or total > MAX_MESSAGE_BYTES:
            raise _Malformed(f"a field of {length} bytes (at most {max_field_bytes}, and "
                             f"{MAX_MESSAGE_BYTES} in one request)")
        fields.append(_recv_exact(sock, length))
    return code, fields


def _timeout_field(seconds: float) -> bytes:
    return _U64.pack(int(max(0.0, min(seconds, _MAX_WAIT_S)) * 1000))


class StoreServer:
    """Serves the store from background threads: ``StoreServer(host, port).start()``.

    Binds at construction, so that an address in use fails at once; port 0 picks a free
    port (read it from ``.port``). Host "" or "0.0.0.0" serves on every interface.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = MAX_CONNECTIONS):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            raise CollectiveError(f"cannot serve the collectives store on {host}:{port}: {e.strerror or e}; "
                                  "choose another port, or stop the process that holds it") from e
        self._listener.setblocking(False)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._max_connections = max_connections
        self._data: dict = {}
        self._bytes = 0
        self._cond = threading.Condition()
        self._conns: set = set()  # guarded by _cond
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
            try:
                # shutdown, unlike close, wakes a handler thread blocked in recv
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        for conn, addr in _netif.accepted(self._listener, self._wake_r):
            with self._cond:
                refuse = self._closed or len(self._conns) >= self._max_connections
                if not refuse:
                    self._conns.add(conn)
            if refuse:
                log.warning("store: refusing a connection from %s:%d: %d connections are open already",
                            addr[0], addr[1], self._max_connections)
                conn.close()
                continue
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(conn, addr),
                             name="collectives-store-conn", daemon=True).start()

    def _serve_connection(self, conn: socket.socket, addr: tuple) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            while True:
                conn.settimeout(None)  # a client may stay idle between requests for a whole job
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        return
                    conn.settimeout(MESSAGE_TIMEOUT_S)  # ... but not stall half-way through one
                    op, fields = _read_message(conn, MAX_VALUE_BYTES)
                except EOFError:
                    return
                except socket.timeout:
                    raise _Malformed(f"a request stalled for {MESSAGE_TIMEOUT_S:g} s") from None
                conn.settimeout(None)  # a GET may wait as long as its own timeout
                conn.sendall(self._execute(op, fields))
        except _Malformed as e:
            log.warning("store: closing the connection from %s: malformed request: %s", peer, e)
        except OSError:
            pass  # the client went away, or close() shut the connection
        finally:
            with self._cond:
                self._conns.discard(conn)
                self._cond.notify_all()  # close(linger) waits for connections to go
            conn.close()

    def _execute(self, op: int, fields: List[bytes]) -> bytes:
        if op == _SET and len(fields) == 2:
            key, value = fields
            self._check_key(key)
            with self._cond:
                grown = self._bytes + len(key) + len(value) - self._entry_bytes(key)
                if grown > MAX_STORE_BYTES:
                    return _pack(_ERROR, [b"the store is full (%d bytes)" % MAX_STORE_BYTES])
                self._data[key] = value
                self._bytes = grown
                self._cond.notify_all()
            return _pack(_OK, [])
        if op == _GET and len(fields) == 2:
            key = fields[0]
            self._check_key(key)
            with self._cond:
                self._wait_for([key], self._timeout(fields[1]))
                if key in self._data:
                    return _pack(_OK, [self._data[key]])
            return _pack(_TIMEOUT, [])
        if op == _ADD and len(fields) == 2:
            key = fields[0]
            self._check_key(key)
            if len(fields[1]) != _I64.size:
                raise _Malformed("ADD without an 8-byte amount")
            (amount,) = _I64.unpack(fields[1])
            with self._cond:
                try:
                    total = int(self._data.get(key, b"0")) + amount
                except ValueError:
                    return _pack(_ERROR, [b"the value of this key is not an integer"])
                value = str(total).encode()
                grown = self._bytes + len(key) + len(value) - self._entry_bytes(key)
                if grown > MAX_STORE_BYTES:
                    return _pack(_ERROR, [b"the store is full (%d bytes)" % MAX_STORE_BYTES])
                self._bytes = grown
                self._data[key] = value
                self._cond.notify_all()
            return _pack(_OK, [_I64.pack(total)])
        if op == _WAIT and 1 <= len(fields) <= MAX_FIELDS + 1:
            keys = fields[1:]
            for key in keys:
                self._check_key(key)
            with self._cond:
                self._wait_for(keys, self._timeout(fields[0]))
                missing = [key for key in keys if key not in self._data]
            return _pack(_TIMEOUT, missing) if missing else _pack(_OK, [])
        raise _Malformed(f"unknown request {op} with {len(fields)} fields")

    def _wait_for(self, keys: List[bytes], timeout: float) -> None:
        """With _cond held: until every key exists, the timeout passes, or close()."""
        self._cond.wait_for(lambda: self._closed or all(k in self._data for k in keys), timeout)
        if self._closed:
            raise OSError("store closed")

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


class StoreClient:
    """A connection to the store. Connects at construction, retrying until ``timeout``
    seconds have passed (the server may start later); ``timeout`` is also the default
    wait of :meth:`get` and :meth:`wait`. Safe to share between threads (calls queue)."""

    def __init__(self, host: str, port: int, timeout: float = 300.0):
        self.address = f"{host}:{port}"
        self.timeout = timeout
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
        """Adds ``amount`` to the integer at ``key`` (0 if unset) and returns the sum."""
        code, fields = self._call(_ADD, [self._key(key), _I64.pack(amount)], 0.0)
        self._check_error(code, fields, key)
        return _I64.unpack(fields[0])[0]

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
            sock = self._sock
            if sock is None:
                raise CollectiveError(f"the connection to the store at {self.address} is closed")
            try:
                sock.settimeout(wait_s + _REPLY_GRACE_S)
                sock.sendall(_pack(op, fields))
                return _read_message(sock, MAX_VALUE_BYTES)
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
