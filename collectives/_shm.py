"""Shared memory between the workers of one host (COLLECTIVES_TRANSPORT auto or shm).

Same-host is found, never assumed from an address: two workers pair over shared memory only
if their hostnames (from the job's signed address records) are equal, one reaches the other's
abstract Unix socket (private to a network namespace: the testbed's emulated hosts never
reach each other's), the kernel vouches for the peer's process (SO_PEERCRED: the pid its
record gave, this user), and the memory proves shared: the lower rank writes a nonce into the
pair's segment, the higher rank answers beside it through its own mapping, and the lower
rank reads the answer back.

The segment is a sealed memfd (collectives._core.create_shm_segment) handed over the Unix
socket with SCM_RIGHTS: it has no name in any file system, only the pair's processes map
it, and it is gone when they are, kill -9 included. Each worker watches a same-host peer
through a pidfd of its process, which becomes readable when it exits.

When every worker runs on one host, they also share a board (collectives._core.create_shm_board):
memory that all of them map, through which an all-reduce takes one step (csrc/algorithms/
allreduce_board.h). Rank 0 makes it and hands it over in each of its pairings; a worker whose
pairing with rank 0 failed has none, so the core agrees at its first all-reduce that would take
the board whether every worker has it (SharedMemory.board_expected), and all use it or none.

Pairs are set up in one global order ((a, b) with a < b, lexicographic), which every worker
follows for its own pairs, so no two wait on each other; a higher rank may connect before its
turn (a connection waits in the listener's backlog), so the lower rank keeps early ones aside. With COLLECTIVES_TRANSPORT=auto a
pair that fails to set up falls back to TCP (both sides: each step after the connection is
bounded by the start-up deadline, so they fail together); with shm it is an error.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import socket
import struct
import json
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from . import _core
from ._config import Config

__all__ = ["SharedMemory", "open_listener", "record_fields", "pair_same_host"]

log = logging.getLogger("collectives")

_RANK = struct.Struct("<I")
_PROBE = struct.Struct("<QQ")  # the segment's first 16 bytes: the nonce, the answer
_ANSWER_MASK = 0xFFFFFFFFFFFFFFFF
# How long the lower rank of a pair waits for the higher one to connect: a peer whose hostname
# matches but whose abstract socket cannot be reached (another network namespace) never does.
_ACCEPT_S = 10.0


class SharedMemory(NamedTuple):
    """What this worker shares with same-host workers; the core owns the descriptors once
    handed to it (until then, close())."""
    doorbell: int = -1  # this worker's doorbell; -1: no pair
    links: Tuple[Any, ...] = ()  # a _core.ShmLink by rank: an empty one for ranks not paired
    board: int = -1  # the host's board; -1: none
    board_expected: bool = False  # every worker runs on this host: each should have the board

    def close(self) -> None:
        for fd in [self.doorbell, self.board] + [fd for link in self.links
                                                 for fd in (link.segment_fd, link.watch_fd, link.doorbell_fd)]:
            if fd >= 0:
                os.close(fd)


def open_listener(config: Config) -> Optional[socket.socket]:
    """The abstract Unix socket where this worker's higher same-host peers reach it; None for
    COLLECTIVES_TRANSPORT=tcp or ucx."""
    if config.transport in ("tcp", "ucx"):
        return None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0collectives-" + secrets.token_hex(16))
    listener.listen(64)
    return listener


def record_fields(listener: Optional[socket.socket]) -> Dict[str, Any]:
    """What this worker adds to its address record for the pairing."""
    if listener is None:
        return {}
    return {"pid": os.getpid(), "unix": listener.getsockname()[1:].hex()}


def pair_same_host(rank: int, records: List[Dict[str, Any]], listener: Optional[socket.socket], config: Config,
                   deadline: float) -> SharedMemory:
    """The pairs of this worker with every same-host peer that shares memory with it, and the
    board where every worker runs on this host."""
    size = len(records)
    hosts = {r["hostname"] for r in records}
    if config.transport == "shm" and len(hosts) > 1:
        raise ValueError(f"COLLECTIVES_TRANSPORT=shm needs every worker on one host, and this job's run on "
                         f"{len(hosts)} ({', '.join(sorted(hosts))}): use auto (shared memory within a host, TCP "
                         "between hosts) or tcp")
    if listener is None:
        return SharedMemory()
    board_from = 0 if _board_wanted(records) else -1  # the rank that makes the board and hands it over
    candidates = [p for p in range(size) if p != rank and records[p]["hostname"] == records[rank]["hostname"]
                  and "unix" in records[p]]
    if not candidates:
        return SharedMemory(board_expected=board_from == 0)
    shared = SharedMemory(_core.create_shm_doorbell(), [_core.ShmLink() for _ in range(size)],
                          board_expected=board_from == 0)
    paired = []
    early: Dict[int, socket.socket] = {}  # higher ranks that connected before their turn
    try:
        if rank == board_from:
            try:
                shared = shared._replace(board=_core.create_shm_board(size))
            except RuntimeError as e:  # out of descriptors or memory: all-reduces go by messages
                log.warning("rank %d: could not make the host's shared board (%s): all-reduces go by messages",
                            rank, e)
        for peer in candidates:  # ascending: the global order of this worker's pairs
            try:
                conn = _accept(peer, candidates, listener, early, deadline) if rank < peer else _connect(records[peer])
                link, board = _pair(conn, rank, peer, records, shared.doorbell, shared.board if rank == board_from
                                    else -1, expects_board=peer == board_from, deadline=deadline)
                shared.links[peer] = link
                if board >= 0:
                    shared = shared._replace(board=board)
                paired.append(peer)
            except (OSError, ValueError, TimeoutError) as e:
                if config.transport == "shm":
                    raise ValueError(f"COLLECTIVES_TRANSPORT=shm: rank {rank} could not share memory with rank "
                                     f"{peer} on {records[rank]['hostname']}: {e}") from None
                log.info("rank %d: rank %d shares the hostname %s but not memory with it (%s): TCP between them",
                         rank, peer, records[rank]["hostname"], e)
    except BaseException:
        shared.close()
        raise
    finally:
        for conn in early.values():
            conn.close()
    if not paired:
        shared.close()
        return SharedMemory(board_expected=shared.board_expected)
    log.info("rank %d: shared memory with rank(s) %s", rank, ", ".join(map(str, paired)))
    return shared


def _board_wanted(records: List[Dict[str, Any]]) -> bool:
    """Every worker on one host, each with a pairing socket, and few enough for one board."""
    return (len({r["hostname"] for r in records}) == 1 and all("unix" in r for r in records)
            and 2 <= len(records) <= _core.BOARD_MAX_MEMBERS)


def _connect(record: Dict[str, Any]) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(_ACCEPT_S)
        conn.connect("\0" + bytes.fromhex(record["unix"]).decode())
    except BaseException:
        conn.close()
        raise
    return conn


def _accept(peer: int, candidates: List[int], listener: socket.socket, early: Dict[int, socket.socket],
            deadline: float) -> socket.socket:
    """The connection of rank `peer`, which says its rank first; others that come before their
    turn are kept in `early`, strangers closed."""
    until = time.monotonic() + _ACCEPT_S
    while peer not in early:
        listener.settimeout(max(0.01, until - time.monotonic()))
        conn, _ = listener.accept()
        try:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            (who,) = _RANK.unpack(_recv_exactly(conn, _RANK.size))
        except BaseException:
            conn.close()
            raise
        if who in candidates and who >= peer and who not in early:  # a pair still to come
            early[who] = conn
        else:
            conn.close()
    return early.pop(peer)


def _pair(conn: socket.socket, rank: int, peer: int, records: List[Dict[str, Any]], doorbell: int, board: int,
          expects_board: bool, deadline: float) -> Tuple[Any, int]:
    """The link to `peer`, and the board if the peer hands one over (only where expects_board;
    else -1); the lower rank hands over `board` if it has one."""
    lower = rank < peer
    with conn:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        if not lower:
            conn.sendall(_RANK.pack(rank))
        _check_credentials(conn, records[peer]["pid"], peer)
        made: List[int] = []  # closed if the pairing fails
        try:
            if lower:
                made.append(_core.create_shm_segment())
                nonce = secrets.randbits(64)
                with _probe_view(made[0]) as view:
                    _PROBE.pack_into(view, 0, nonce, 0)
                socket.send_fds(conn, [b"s"], [made[0], doorbell] + ([board] if board >= 0 else []))
                _, fds, _, _ = socket.recv_fds(conn, 1, 1)
                made += fds
                if len(fds) != 1:
                    raise ValueError("the peer sent no doorbell")
                with _probe_view(made[0]) as view:
                    if _PROBE.unpack_from(view, 0)[1] != nonce ^ _ANSWER_MASK:
                        raise ValueError("the pair's memory is not shared (the probe's answer did not come)")
                conn.sendall(b"k")
            else:
                # The board comes third where the peer made one (it may not have managed to).
                _, fds, _, _ = socket.recv_fds(conn, 1, 3 if expects_board else 2)
                made += fds
                if len(fds) < 2:
                    raise ValueError("the peer sent no segment")
                with _probe_view(made[0]) as view:
                    nonce, _ = _PROBE.unpack_from(view, 0)
                    _PROBE.pack_into(view, 0, nonce, nonce ^ _ANSWER_MASK)
                socket.send_fds(conn, [b"d"], [doorbell])
                if _recv_exactly(conn, 1) != b"k":
                    raise ValueError("the peer did not confirm the pairing")
            made.append(os.pidfd_open(records[peer]["pid"]))
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
    if len(made) == 4:  # the segment (or the lower rank's own), the peer's doorbell, the board, the watch
        segment, peer_doorbell, received_board, watch = made
    else:
        (segment, peer_doorbell, watch), received_board = made, -1
    return _core.ShmLink(segment_fd=segment, watch_fd=watch, doorbell_fd=peer_doorbell,
                         pid=records[peer]["pid"]), received_board


def _check_credentials(conn: socket.socket, pid: int, peer: int) -> None:
    got_pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if got_pid != pid or uid != os.getuid():
        raise ValueError(f"the process at rank {peer}'s socket is pid {got_pid} (uid {uid}), not the pid {pid} its "
                         "record gives")


def _probe_view(segment: int) -> mmap.mmap:
    return mmap.mmap(segment, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("the peer closed the pairing")
        data += chunk
    return data
