"""Authenticated connections: a mutual HMAC-SHA256 challenge-response over a fresh socket.

Every data connection passes this before its first frame. Messages (big-endian):

    prefix  = "COLL" version:u16                      (the same in every protocol version)
    hello   = prefix role:u8 rank:u32 conn:u16 job_id:16B challenge:32B security:u8  client -> server
    reply   = prefix status:u8, then if OK: role:u8 rank:u32 challenge:32B mac:32B
                                else: length:u16 text                            server -> client
    proof   = status:u8 mac:32B                                                  client -> server
    verdict = status:u8 length:u16 text                                          server -> client

Each side's MAC is HMAC-SHA256(secret, label || transcript), the transcript holding the
protocol version, the job id and both hellos (roles, ranks, connection index, both fresh
challenges), with a label that differs per side: a message replayed from another
connection, or reflected back to its sender, does not verify. The secret never crosses the
wire. The client is the first to check a MAC, so an honest client with the wrong secret
learns it first and tells the server, and both raise AuthenticationError. The server
refuses a client whose wire security (COLLECTIVES_WIRE_SECURITY) is not its own.

Both ends then derive the session's keys (SessionKeys) from the secret and the transcript;
the core protects every frame of the connection with them (csrc/transport/wire_security.h).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import selectors
import socket
import struct
import threading
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from . import _core, _netif
from ._config import WIRE_SECURITY, Config
from .errors import AuthenticationError, CollectiveError, ProtocolVersionError, TimeoutError

__all__ = ["PROTOCOL_VERSION", "ROLE_WORKER", "ROLE_REDUCER", "JOB_ID_BYTES", "MAX_PENDING_HANDSHAKES", "MAX_PENDING_PER_SOURCE",
           "HELLO_TIMEOUT_S", "PeerHello", "SessionKeys",
           "Acceptor", "client_handshake", "server_handshake", "describe_peer"]

# The wire protocol's one version number lives in the core (transport/frame.h); the
# handshake refuses peers of another version before any frame is exchanged.
PROTOCOL_VERSION = _core.PROTOCOL_VERSION
ROLE_WORKER = 0
ROLE_REDUCER = 1
JOB_ID_BYTES = 16
# Accepted connections that have not proven themselves (waiting for their hello, or in
# their handshake), at most: strangers cannot make a process hold fds or threads without
# limit, and a newcomer beyond them evicts the oldest (see Acceptor).
MAX_PENDING_HANDSHAKES = 256
# ... and from one source address, so that a flood from one host evicts only its own.
MAX_PENDING_PER_SOURCE = 64
# The job's processes send their hello as soon as they connect; a connection that has not
# sent it this long after it was accepted is closed.
HELLO_TIMEOUT_S = 3.0

_MAGIC = b"COLL"
_PREFIX = struct.Struct("!4sH")
_HELLO = struct.Struct("!BIH16s32s")
_SECURITY = struct.Struct("!B")  # follows the client's hello: its COLLECTIVES_WIRE_SECURITY
_SERVER_HELLO = struct.Struct("!BI32s")  # followed by the MAC
_MAC_BYTES = 32
_PROOF = struct.Struct("!B32s")  # status, MAC
_STATUS = struct.Struct("!B")
_TEXT_LENGTH = struct.Struct("!H")
_MAX_TEXT = 1024
_CHALLENGE_BYTES = 32

# statuses; the refusal of another version's peer keeps this layout in every version
_OK, _REFUSED_VERSION, _REFUSED, _AUTH_FAILED = 0, 1, 2, 3
_ROLE_NAMES = {ROLE_WORKER: "rank", ROLE_REDUCER: "reducer"}


class SessionKeys(NamedTuple):
    """How one authenticated connection's frames are protected from here on: the wire
    security both ends use, and the key of each direction, derived from the job's secret and
    this handshake's transcript (both fresh challenges), so that a relay that passed the
    handshake through knows neither."""
    security: str
    send: bytes
    recv: bytes

    def __repr__(self) -> str:  # never the keys, in a log or a traceback
        return f"SessionKeys(security={self.security!r})"

    def link(self, sock: socket.socket) -> "_core.Link":
        """The socket as the core takes it; the core owns its fd from here on."""
        sock.setblocking(True)
        return _core.Link(sock.detach(), WIRE_SECURITY.index(self.security), self.send, self.recv)


class PeerHello(NamedTuple):
    """Who connected, as proven by the handshake (and, once it is done, the session's keys)."""
    rank: int
    conn_index: int
    role: int
    keys: Optional[SessionKeys] = None


def describe_peer(role: int, rank: int, address: str) -> str:
    """'rank 3 at 10.0.0.2:4000' or 'reducer 1 at ...', for error messages."""
    return f"{_name(role, rank)} at {address}"


def _name(role: int, rank: int) -> str:
    return f"{_ROLE_NAMES.get(role, f'role-{role}')} {rank}"


def _address(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "an unknown address"
    if not isinstance(peer, tuple):  # AF_UNIX (a socketpair): a path, or none
        return f"the local socket {peer}" if peer else "a local socket"
    return f"{peer[0]}:{peer[1]}"


class _Channel:
    """Blocking reads and writes that fail with a clear error at the handshake's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, peer: str):
        self.sock = sock
        self.deadline = deadline
        self.start = time.monotonic()
        self.peer = peer

    def _arm(self, what: str) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self._timed_out(what)
        self.sock.settimeout(remaining)

    def _timed_out(self, what: str) -> None:
        raise TimeoutError(f"{self.peer} did not complete the connection handshake within "
                           f"{self.deadline - self.start:.3g} s (waiting for its {what})")

    def recv(self, n: int, what: str) -> bytes:
        buf = bytearray()
        try:
            while len(buf) < n:
                self._arm(what)
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    raise CollectiveError(f"{self.peer} closed the connection during the handshake "
                                          f"(waiting for its {what})")
                buf += chunk
        except socket.timeout:
            self._timed_out(what)
        except OSError as e:
            raise CollectiveError(f"connection to {self.peer} failed during the handshake "
                                  f"(waiting for its {what}): {e}") from None
        return bytes(buf)

    def send(self, data: bytes, what: str) -> None:
        try:
            self._arm(f"acceptance of our {what}")
            self.sock.sendall(data)
        except socket.timeout:
            self._timed_out(f"acceptance of our {what}")
        except OSError as e:
            raise CollectiveError(f"connection to {self.peer} failed during the handshake "
                                  f"(sending our {what}): {e}") from None

    def recv_text(self) -> str:
        (length,) = _TEXT_LENGTH.unpack(self.recv(_TEXT_LENGTH.size, "reason"))
        if length > _MAX_TEXT:
            raise CollectiveError(f"{self.peer} sent a malformed handshake message")
        return self.recv(length, "reason").decode("utf-8", errors="replace")


def _text(message: str) -> bytes:
    data = message.encode("utf-8")[:_MAX_TEXT]
    return _TEXT_LENGTH.pack(len(data)) + data


def _mac(secret: bytes, label: bytes, version: int, job_id: bytes, client_hello: bytes, server_hello: bytes) -> bytes:
    transcript = b"collectives-handshake|%d|" % version + job_id + client_hello + server_hello
    return hmac.new(secret, label + transcript, hashlib.sha256).digest()


def _session_keys(secret: bytes, version: int, job_id: bytes, client_hello: bytes, server_hello: bytes,
                  security: str, client: bool) -> SessionKeys:
    transcript = b"collectives-session|%d|" % version + job_id + client_hello + server_hello
    keys = _core.derive_session_keys(secret, transcript)
    client_sends, server_sends = keys[:len(keys) // 2], keys[len(keys) // 2:]
    if client:
        return SessionKeys(security, client_sends, server_sends)
    return SessionKeys(security, server_sends, client_sends)


def _security_code(security: str) -> bytes:
    if security not in WIRE_SECURITY:
        raise ValueError(f"wire security {security!r} is not one of {', '.join(WIRE_SECURITY)}")
    return _SECURITY.pack(WIRE_SECURITY.index(security))


def _version_error(peer: str, theirs: int, ours: int) -> ProtocolVersionError:
    return ProtocolVersionError(f"{peer} speaks collectives protocol {theirs}, this process speaks {ours}: "
                                "install the same collectives version on every host")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the job secret must be non-empty bytes")


def client_handshake(sock: socket.socket, secret: bytes, my_rank: int, peer_rank: int, conn_index: int,
                     deadline: float, *, job_id: bytes = bytes(JOB_ID_BYTES), role: int = ROLE_WORKER,
                     peer_role: int = ROLE_WORKER, protocol_version: Optional[int] = None,
                     security: str = Config.wire_security) -> SessionKeys:
    """Authenticates a socket we connected to ``peer_rank`` (of ``peer_role``), as our
    connection number ``conn_index`` to it, and returns the session's keys. ``deadline`` is
    a time.monotonic() value. ``security`` (COLLECTIVES_WIRE_SECURITY) must be the peer's.
    ``protocol_version`` (default PROTOCOL_VERSION, looked up when called, so that the
    module's constant is the one place the version lives) lets tests play another version.

    Raises AuthenticationError, ProtocolVersionError, TimeoutError or CollectiveError, all
    naming the peer; on success the socket is left in blocking mode.
    """
    _check_secret(secret)
    if len(job_id) != JOB_ID_BYTES:
        raise ValueError(f"job_id must be {JOB_ID_BYTES} bytes")
    protocol_version = PROTOCOL_VERSION if protocol_version is None else protocol_version
    peer = describe_peer(peer_role, peer_rank, _address(sock))
    me = _name(role, my_rank)
    channel = _Channel(sock, deadline, peer)
    challenge = secrets.token_bytes(_CHALLENGE_BYTES)
    hello = _HELLO.pack(role, my_rank, conn_index, job_id, challenge) + _security_code(security)
    channel.send(_PREFIX.pack(_MAGIC, protocol_version) + hello, "hello")

    magic, version = _PREFIX.unpack(channel.recv(_PREFIX.size, "hello"))
    if magic != _MAGIC:
        raise CollectiveError(f"{peer} is not a collectives process (it answered with bytes {magic!r})")
    if version != protocol_version:
        raise _version_error(peer, version, protocol_version)
    (status,) = _STATUS.unpack(channel.recv(_STATUS.size, "hello"))
    if status != _OK:
        raise CollectiveError(f"{peer} refused the connection: {channel.recv_text()}")
    server_hello = channel.recv(_SERVER_HELLO.size, "hello")
    their_role, their_rank, _ = _SERVER_HELLO.unpack(server_hello)
    their_mac = channel.recv(_MAC_BYTES, "proof")

    expected = _mac(secret, b"server", version, job_id, hello, server_hello)
    if not hmac.compare_digest(expected, their_mac):
        channel.send(_PROOF.pack(_AUTH_FAILED, bytes(_MAC_BYTES)), "proof")
        raise AuthenticationError(f"{peer} failed to prove to {me} that it holds the job's secret: the two "
                                  "use different COLLECTIVES_TOKEN values (or the handshake was altered on the way), or a "
                                  "process of another job answered")
    if (their_role, their_rank) != (peer_role, peer_rank):
        channel.send(_PROOF.pack(_REFUSED, bytes(_MAC_BYTES)), "proof")
        raise CollectiveError(f"expected {peer}, but {describe_peer(their_role, their_rank, _address(sock))} "
                              "answered: its published address is stale, or two processes claim one rank")
    proof = _mac(secret, b"client", version, job_id, hello, server_hello)
    channel.send(_PROOF.pack(_OK, proof), "proof")

    (verdict,) = _STATUS.unpack(channel.recv(_STATUS.size, "verdict"))
    reason = channel.recv_text()
    if verdict == _AUTH_FAILED:
        raise AuthenticationError(f"{peer} rejected the proof of the job's secret from {me}: {reason}")
    if verdict != _OK:
        raise CollectiveError(f"{peer} refused the connection: {reason}")
    sock.settimeout(None)
    return _session_keys(secret, version, job_id, hello, server_hello, security, client=True)


def server_handshake(sock: socket.socket, secret: bytes, my_rank: int, deadline: float, *,
                     job_id: bytes = bytes(JOB_ID_BYTES), role: int = ROLE_WORKER,
                     check: Optional[Callable[[PeerHello], Optional[str]]] = None,
                     protocol_version: Optional[int] = None, security: str = Config.wire_security) -> PeerHello:
    """Authenticates a socket we accepted and returns who is on the other end, with the
    session's keys. ``security`` (COLLECTIVES_WIRE_SECURITY) must be the peer's.

    ``check``, given the authenticated peer, may return a reason to refuse it (a duplicate
    or out-of-range rank); the peer is told the reason and CollectiveError is raised here.
    Raises as :func:`client_handshake` does; on success the socket is in blocking mode.
    """
    _check_secret(secret)
    if len(job_id) != JOB_ID_BYTES:
        raise ValueError(f"job_id must be {JOB_ID_BYTES} bytes")
    protocol_version = PROTOCOL_VERSION if protocol_version is None else protocol_version
    address = _address(sock)
    me = _name(role, my_rank)
    channel = _Channel(sock, deadline, f"the peer at {address}")
    magic, version = _PREFIX.unpack(channel.recv(_PREFIX.size, "hello"))
    if magic != _MAGIC:
        raise CollectiveError(f"the peer at {address} is not a collectives process (it sent bytes {magic!r})")
    if version != protocol_version:
        # Text for humans reading a capture; the client words its own error from the prefix.
        channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_REFUSED_VERSION) +
                     _text(f"this process speaks collectives protocol {protocol_version}, you speak {version}"),
                     "refusal")
        raise _version_error(f"the peer at {address}", version, protocol_version)
    hello = channel.recv(_HELLO.size + _SECURITY.size, "hello")
    their_role, their_rank, conn_index, their_job, _ = _HELLO.unpack(hello[:_HELLO.size])
    (their_security,) = _SECURITY.unpack(hello[_HELLO.size:])
    channel.peer = peer = describe_peer(their_role, their_rank, address)
    if their_job != job_id:
        channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_REFUSED) +
                     _text("the connecting process belongs to another job (its address list is stale)"), "refusal")
        raise CollectiveError(f"{peer} belongs to another job: it connected to a stale address")
    if _security_code(security) != hello[_HELLO.size:]:
        theirs = WIRE_SECURITY[their_security] if their_security < len(WIRE_SECURITY) else f"code {their_security}"
        reason = (f"{peer} uses COLLECTIVES_WIRE_SECURITY={theirs} and {me} uses {security}: set the same value on "
                  "every worker and reducer of the job")
        channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_REFUSED) + _text(reason), "refusal")
        raise CollectiveError(reason)

    challenge = secrets.token_bytes(_CHALLENGE_BYTES)
    server_hello = _SERVER_HELLO.pack(role, my_rank, challenge)
    mac = _mac(secret, b"server", version, job_id, hello, server_hello)
    channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_OK) + server_hello + mac, "hello")

    status, their_mac = _PROOF.unpack(channel.recv(_PROOF.size, "proof"))
    if status == _AUTH_FAILED:
        raise AuthenticationError(f"{peer} rejected the proof of the job's secret from {me}: the two use "
                                  "different COLLECTIVES_TOKEN values")
    if status != _OK:
        raise CollectiveError(f"{peer} refused the connection: it expected another process at this address")
    expected = _mac(secret, b"client", version, job_id, hello, server_hello)
    if not hmac.compare_digest(expected, their_mac):
        channel.send(_STATUS.pack(_AUTH_FAILED) + _text("its proof is wrong: the two use different "
                                                         "COLLECTIVES_TOKEN values"), "verdict")
        raise AuthenticationError(f"{peer} failed to prove to {me} that it holds the job's secret: the two "
                                  "use different COLLECTIVES_TOKEN values (or the handshake was altered on the way)")
    keys = _session_keys(secret, version, job_id, hello, server_hello, security, client=False)
    peer_hello = PeerHello(their_rank, conn_index, their_role, keys)
    reason = check(peer_hello) if check is not None else None
    if reason is not None:
        channel.send(_STATUS.pack(_REFUSED) + _text(reason), "verdict")
        raise CollectiveError(f"refused {peer}: {reason}")
    channel.send(_STATUS.pack(_OK) + _text(""), "verdict")
    sock.settimeout(None)
    return peer_hello


class _Pending:
    """A connection that the acceptor took and that has not proven itself yet."""

    WAITING, STRANGER, EXPECTED = 0, 1, 2  # stages: evicted in this order, oldest first

    def __init__(self, conn: socket.socket, address: str, source: str):
        self.conn, self.address, self.source = conn, address, source
        self.since = time.monotonic()
        self.stage = _Pending.WAITING  # until its hello is in; then handed to a handshake thread
        self.evicted: Optional[Exception] = None  # why, once the acceptor closed it for a newcomer

    def victim_order(self) -> Tuple[int, float]:
        return self.stage, self.since


class Acceptor:
    """Accepts connections on a listening socket, in a thread, and authenticates each in a
    thread of its own, so that a silent stranger delays nobody.

    ``authenticate(conn)`` runs the server side of the handshake (usually
    :func:`server_handshake` with a ``check``). The connections that pass it go to
    ``on_peer(hello, conn)``; each one that fails is closed and its ``(address, error)``
    goes to ``on_refused``. Both are called from the acceptor's threads, also after
    :meth:`stop` for handshakes that were under way.

    Strangers cannot keep the job's own processes out: a connection must send its hello
    within HELLO_TIMEOUT_S (the accept thread waits for it, with no thread of its own);
    only then does its handshake start. At most MAX_PENDING_HANDSHAKES connections wait
    or shake hands at once, MAX_PENDING_PER_SOURCE of them from one address; a newcomer
    beyond either bound is taken, and the oldest connection that has not sent a hello is
    closed for it, else the oldest whose hello names nobody that ``expects(hello, job_id)``
    waits for, else the oldest. A process of the job sends its hello at once and finishes
    its handshake in a round trip, so it is never the oldest for long.
    """

    def __init__(self, listener: socket.socket, authenticate: Callable[[socket.socket], PeerHello],
                 on_peer: Callable[[PeerHello, socket.socket], None],
                 on_refused: Callable[[str, Exception], None],
                 expects: Optional[Callable[[PeerHello, bytes], bool]] = None):
        self._listener = listener
        self._authenticate, self._on_peer, self._on_refused = authenticate, on_peer, on_refused
        self._expects = expects
        self._lock = threading.Lock()
        self._pending: Dict[socket.socket, _Pending] = {}  # guarded by _lock; insertion order is age
        self._selector: Optional[selectors.BaseSelector] = None  # the accept thread's only
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Acceptor":
        self._listener.setblocking(False)
        # Here, not in the thread, so that a process out of descriptors fails in its caller.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._accept_loop, name="collectives-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting; idempotent. The listener stays open (its owner closes it)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._wake_w.send(b"\0")
        thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        exhaustion = _netif.FdExhaustion(f"the port {_port(self._listener)}")
        with self._selector:
            try:
                while True:
                    for key, _ in self._selector.select(self._until_first_hello_deadline()):
                        if key.fileobj is self._wake_r:
                            return
                        if key.fileobj is self._listener:
                            accepted = _netif.accept(self._listener, exhaustion, self._evict_for_newcomer)
                            if accepted is not None:
                                self._take(*accepted)
                        else:
                            self._read_hello(key.data)
                    self._close_silent()
            finally:
                for pending in self._waiting():
                    self._drop(pending, None)

    def _take(self, conn: socket.socket, addr: tuple) -> None:
        pending = _Pending(conn, f"{addr[0]}:{addr[1]}", addr[0])
        with self._lock:
            if len(self._pending) >= MAX_PENDING_HANDSHAKES:
                self._evict(self._pending.values(), f"{MAX_PENDING_HANDSHAKES} connections")
            from_source = [p for p in self._pending.values() if p.source == pending.source]
            if len(from_source) >= MAX_PENDING_PER_SOURCE:
                self._evict(from_source, f"{MAX_PENDING_PER_SOURCE} connections from {pending.source}")
            self._pending[conn] = pending
        # Readable once the prefix is in (or the peer closed): no wake-up per byte trickled.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _PREFIX.size)
        self._selector.register(conn, selectors.EVENT_READ, pending)

    def _evict_for_newcomer(self) -> None:
        """Out of file descriptors: frees one for the connection that waits to be accepted."""
        with self._lock:
            if self._pending:
                self._evict(self._pending.values(), "out of file descriptors")

    def _evict(self, candidates: Iterable[_Pending], why: str) -> None:
        """With _lock held: closes the candidate that has proven least, oldest first."""
        victim = min(candidates, key=_Pending.victim_order)
        error = CollectiveError(f"closed to make room for a newer connection ({why} were waiting to prove "
                                "themselves)")
        if victim.stage == _Pending.WAITING:
            del self._pending[victim.conn]
            self._unregister(victim)
            victim.conn.close()
            self._on_refused(victim.address, error)
        else:  # its handshake thread wakes, closes it and reports why
            victim.evicted = error
            del self._pending[victim.conn]
            try:
                victim.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read_hello(self, pending: _Pending) -> None:
        """Hands the connection to a handshake thread once its hello is in, or closes it."""
        try:
            data = pending.conn.recv(_PREFIX.size + _HELLO.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(pending, CollectiveError(f"the connection failed before its hello: {e}"))
            return
        if len(data) < _PREFIX.size:  # readable with less than the prefix: it closed
            self._drop(pending, CollectiveError("closed the connection before sending a hello"))
            return
        magic, version = _PREFIX.unpack(data[:_PREFIX.size])
        if magic == _MAGIC and version == PROTOCOL_VERSION and len(data) < _PREFIX.size + _HELLO.size:
            pending.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _PREFIX.size + _HELLO.size)
            return
        # Garbage or another version goes to the handshake too, which refuses it in words.
        pending.stage = self._stage(data)
        self._unregister(pending)
        pending.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        threading.Thread(target=self._shake_hands, args=(pending,), name="collectives-handshake",
                         daemon=True).start()

    def _stage(self, data: bytes) -> int:
        if len(data) < _PREFIX.size + _HELLO.size or data[:len(_MAGIC)] != _MAGIC:
            return _Pending.STRANGER
        role, rank, conn_index, job_id, _ = _HELLO.unpack(data[_PREFIX.size:])
        if self._expects is not None and not self._expects(PeerHello(rank, conn_index, role), job_id):
            return _Pending.STRANGER
        return _Pending.EXPECTED

    def _shake_hands(self, pending: _Pending) -> None:
        conn = pending.conn
        try:
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = self._authenticate(conn)
        except (CollectiveError, OSError) as e:
            self._forget(pending)
            conn.close()
            self._on_refused(pending.address, pending.evicted or e)
            return
        self._forget(pending)
        self._on_peer(hello, conn)

    def _forget(self, pending: _Pending) -> None:
        with self._lock:
            self._pending.pop(pending.conn, None)

    def _waiting(self) -> List[_Pending]:
        with self._lock:
            return [p for p in self._pending.values() if p.stage == _Pending.WAITING]

    def _until_first_hello_deadline(self) -> Optional[float]:
        waiting = self._waiting()
        if not waiting:
            return None
        return max(0.0, waiting[0].since + HELLO_TIMEOUT_S - time.monotonic())

    def _close_silent(self) -> None:
        now = time.monotonic()
        for pending in self._waiting():
            if now - pending.since < HELLO_TIMEOUT_S:
                break  # the others came later
            self._drop(pending, TimeoutError(f"sent no hello within {HELLO_TIMEOUT_S:g} s of connecting"))

    def _drop(self, pending: _Pending, error: Optional[Exception]) -> None:
        """Closes a connection that waits for its hello; reports why, unless ``error`` is None."""
        self._forget(pending)
        self._unregister(pending)
        pending.conn.close()
        if error is not None:
            self._on_refused(pending.address, error)

    def _unregister(self, pending: _Pending) -> None:
        try:
            self._selector.unregister(pending.conn)
        except (KeyError, ValueError):
            pass


def _port(listener: socket.socket) -> str:
    try:
        return str(listener.getsockname()[1])
    except OSError:
        return "?"
