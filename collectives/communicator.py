"""The Communicator: collectives among the workers of a job."""

from __future__ import annotations

import atexit
import builtins
import ctypes
import dataclasses
import logging
import os
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import _buffers, _core, _device, hierarchical, ring
from ._bootstrap import Bootstrap, bootstrap
from ._config import Config
from .reduction_server.host_plan import HostPlan, host_plan
from .errors import CollectiveError

__all__ = ["Communicator", "Work", "init"]

logger = logging.getLogger("collectives")

OPS = tuple(_core.OPS)


def op_code(op: str, dtype: str) -> int:
    """The core's code of reduce op ``op`` (one of OPS) for elements of ``dtype`` (its name:
    "float32", ...), or ValueError saying why not: for the plugins' collectives too."""
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {', '.join(OPS)}")
    code = OPS.index(op)
    if dtype in _buffers.DTYPES:  # another is refused where its buffer is taken
        _core.check_reducible(_buffers.DTYPES.index(dtype), code)
    return code
# How often a waiting thread returns to Python, so that Ctrl-C is handled promptly.
_WAIT_SLICE_SECONDS = 0.1
# recv's src for a message from any rank (MPI_ANY_SOURCE).
ANY_SOURCE = -1


class Work:
    """A collective in flight. wait() returns its result or raises its error."""

    def __init__(self, comm: "Communicator", core_work: Any, result: Any, keep_alive: tuple):
        self._comm = comm
        self._core_work = core_work
        self._result = result
        self._keep_alive = keep_alive  # the buffers the core reads and writes

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Block until done; return the result (the buffer, or the new array).

        `timeout` bounds only this wait, not the collective (whose deadline is the
        communicator's timeout): the builtin TimeoutError if it passes first, and the
        collective goes on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._core_work.wait_for(self._slice(deadline)):
                if deadline is not None and time.monotonic() >= deadline:
                    raise builtins.TimeoutError(f"wait(timeout={timeout}) passed before the collective finished")
        except KeyboardInterrupt:
            # The caller may reuse the buffers as soon as this returns: end the collective
            # first. The communicator cannot go on without its peers anyway.
            self._comm._interrupt()
            raise
        return self._result

    @staticmethod
    def _slice(deadline: Optional[float]) -> float:
        # Short waits, so that Ctrl-C is handled promptly between them.
        if deadline is None:
            return _WAIT_SLICE_SECONDS
        return min(_WAIT_SLICE_SECONDS, max(0.0, deadline - time.monotonic()))

    def done(self) -> bool:
        return self._core_work.done()

    @property
    def source(self) -> int:
        """A receive's sender, its rank in the communicator (from ANY_SOURCE: once done, -1
        before); -1 for every other Work."""
        return getattr(self._core_work, "source", -1)


class Communicator:
    """Collectives among `size` workers; create it with collectives.init()."""

    def __init__(self, boot: Bootstrap, config: Config):
        self._core = None
        self._boot = boot
        # Under mpirun the reducers were counted at launch, not by COLLECTIVES_NUM_REDUCERS;
        # auto's transport is UCX where the workers chose it at bootstrap.
        self._config = config = dataclasses.replace(config, num_reducers=len(boot.reducer_links),
                                                    transport=boot.transport)
        self._pid = os.getpid()
        self._pending: List[Work] = []
        self._staging = _device.Staging()
        self._plan = _hierarchy(config, boot.topology)
        self._reducer_plan = _reducer_plan(config, boot.rank, boot.topology)
        self._core = _core.Communicator(
            boot.rank, boot.size, boot.peer_links, boot.peer_names, _options(config, self._plan, self._reducer_plan),
            boot.reducer_links,
            boot.reducer_names, boot.shm.doorbell, boot.shm.links, boot.shm.board, boot.shm.board_expected,
            ucx=config.transport == "ucx" and boot.size > 1
        )
        self._rank, self._size, self._members = boot.rank, boot.size, list(range(boot.size))
        self._topology = boot.topology
        _live.add(self)
        if boot.reducer_links:
            logger.info("rank %d of %d: allreduce runs %s; %d reducer(s) connected", self.rank, self.size,
                        self.algorithm, len(boot.reducer_links))
        logger.debug("rank %d of %d ready (%s)", self.rank, self.size, config.as_dict())

    @classmethod
    def _subgroup(cls, parent: "Communicator", members: List[int], algorithm: Optional[str]) -> "Communicator":
        """Over `members` (ranks of `parent`, in the new order), sharing its connections."""
        # The reducers serve the world only: a subgroup's allreduce runs among its members, by
        # `algorithm`, or as the parent's does where that is one of the ring family.
        if algorithm is None:
            inherited = parent._config.effective_algorithm
            algorithm = inherited if inherited in _SUBGROUP_ALGORITHMS else "auto"
        if algorithm not in _SUBGROUP_ALGORITHMS:
            raise ValueError(f"a subgroup's algorithm is one of {', '.join(_SUBGROUP_ALGORITHMS)}, not {algorithm!r}")
        self = cls.__new__(cls)
        self._core = None  # until made: __del__ looks at it
        self._boot = None
        self._config = dataclasses.replace(parent._config, algorithm=algorithm, num_reducers=0)
        self._pid = os.getpid()
        self._pending = []
        self._staging = _device.Staging()
        self._topology = [parent._topology[m] for m in members]
        self._plan = _hierarchy(self._config, self._topology)  # from its members' labels
        self._reducer_plan = None
        self._core = parent._live_core().subgroup([parent._members[m] for m in members],
                                                  _options(self._config, self._plan))
        self._rank, self._size = self._core.rank, self._core.size
        self._members = [parent._members[m] for m in members]
        _live.add(self)
        return self

    # -- identity -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def mpi_comm(self):
        """The workers-only MPI communicator when launched by mpirun, else None (also for
        communicators made by split or create_group)."""
        return self._boot.mpi_comm if self._boot is not None else None

    @property
    def topology(self) -> List[str]:
        """Each rank's place, by rank: COLLECTIVES_TOPOLOGY's levels above its host, then its
        hostname ("rack2/host5")."""
        return list(self._topology)

    # -- groups -------------------------------------------------------------------------------
    def split(self, color: Optional[int], key: int = 0, *, algorithm: Optional[str] = None) -> Optional["Communicator"]:
        """MPI_Comm_split: a collective of this communicator. Ranks that pass the same color
        form one new communicator, ordered by key, then by rank here; color None (or negative,
        MPI_UNDEFINED) gives None. The new communicator runs over the existing connections;
        its allreduce runs `algorithm` ("auto", "ring" or "recursive_doubling"; default: this
        one's, or auto where this one uses the reducers)."""
        for name, value in (("color", color), ("key", key)):
            if value is not None and not isinstance(value, (int, np.integer)):
                raise TypeError(f"split's {name} must be an int, not {type(value).__name__}")
        undefined = color is None or color < 0
        mine = np.array([-1 if undefined else color, key], np.int64)
        everyone = self.allgather(mine)
        if undefined:
            return None
        members = sorted((r for r in range(self.size) if everyone[r][0] == color), key=lambda r: (everyone[r][1], r))
        return Communicator._subgroup(self, members, algorithm)

    def create_group(self, ranks: Sequence[int], *, algorithm: Optional[str] = None) -> "Communicator":
        """MPI_Comm_create_group: a communicator over `ranks` (ranks here, in the new order),
        collective over those ranks only: each of them calls it, with the same list, and no
        other rank does. Runs over the existing connections; `algorithm` as for split."""
        ranks = [int(r) for r in ranks]
        if sorted(set(ranks)) != sorted(ranks) or not all(0 <= r < self.size for r in ranks):
            raise ValueError(f"create_group needs distinct ranks of this {self.size}-rank communicator, got {ranks}")
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} called create_group({ranks}) but is not one of them: only the "
                             "listed ranks call it")
        return Communicator._subgroup(self, ranks, algorithm)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def algorithm(self) -> str:
        """The algorithm that allreduce runs: "ring", "recursive_doubling", "reduction_server"
        (the flat plan) or "reduction_server:host" (its host plan), the hierarchical plan
        ("hierarchical(4 ranks/host x 2 hosts)"), or "auto" (per call, the ring or recursive
        doubling by the cost model: recursive doubling for small messages),
        "auto:hierarchical(...)" where the hierarchical plan is a candidate too."""
        algorithm = self._config.effective_algorithm
        if self._reducer_plan is not None:
            return self._reducer_plan.algorithm
        if self._plan is None:
            return algorithm
        return self._plan.description if algorithm == "hierarchical" else f"auto:{self._plan.description}"

    @property
    def c_handle(self) -> int:
        """This communicator for compiled extensions through collectives' C API
        (collectives.c_api); its collectives queue behind this one's. Once it is closed, a
        collective queued through the handle fails with "the communicator is closed" (a
        tf.function traced before ctf.shutdown() and run after a new ctf.init())."""
        core = self._live_core()
        _cores_handed_to_extensions.add(core)
        return core.address

    def reducer_stats(self) -> List[Dict[str, Any]]:
        """Per reducer, by index: {name, alive, bytes_sent, bytes_received} as this worker saw it."""
        return self._live_core().reducer_stats()

    # -- collectives --------------------------------------------------------------------------
    def allreduce(self, x, op: str = "sum"):
        """Reduce x over all ranks, in place; returns x."""
        return self._allreduce(x, op, blocking=True)

    def allreduce_async(self, x, op: str = "sum") -> Work:
        return self._allreduce(x, op, blocking=False)

    def allgather(self, x):
        """A new array of x's kind, shape (size, *x.shape): row r is rank r's x."""
        return self._allgather(x, blocking=True)

    def allgather_async(self, x) -> Work:
        return self._allgather(x, blocking=False)

    def broadcast(self, x, root: int = 0):
        """Overwrite x with root's x, in place; returns x."""
        return self._broadcast(x, root, blocking=True)

    def broadcast_async(self, x, root: int = 0) -> Work:
        return self._broadcast(x, root, blocking=False)

    def reduce_scatter(self, x, op: str = "sum"):
        """This rank's part of x reduced over all ranks: rows [rank*k, (rank+1)*k), k = len(x)//size."""
        return self._reduce_scatter(x, op, blocking=True)

    def reduce_scatter_async(self, x, op: str = "sum") -> Work:
        return self._reduce_scatter(x, op, blocking=False)

    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        self._complete(self._live_core().barrier(True), None, (), blocking=True)

    def barrier_async(self) -> Work:
        return self._complete(self._live_core().barrier(False), None, (), blocking=False)

    def reduce(self, x, root: int = 0, op: str = "sum"):
        """Reduce x over all ranks into root's x, in place; returns x (left as it was on the
        other ranks)."""
        return self._reduce(x, root, op, blocking=True)

    def reduce_async(self, x, root: int = 0, op: str = "sum") -> Work:
        return self._reduce(x, root, op, blocking=False)

    def gather(self, x, root: int = 0):
        """On root: a new array of x's kind, shape (size, *x.shape), row r rank r's x. Elsewhere: None."""
        return self._gather(x, root, blocking=True)

    def gather_async(self, x, root: int = 0) -> Work:
        return self._gather(x, root, blocking=False)

    def scatter(self, rows, root: int = 0, out=None):
        """Row r of root's ``rows`` (shape (size, *s)) to rank r: returns this rank's row, in ``out``
        if given (shape s, written in place), else in a new array. Other ranks pass ``out``, or
        ``rows`` shaped as the root's (its contents unused)."""
        return self._scatter(rows, root, out, blocking=True)

    def scatter_async(self, rows, root: int = 0, out=None) -> Work:
        return self._scatter(rows, root, out, blocking=False)

    def alltoall(self, x, send_splits: Optional[Sequence[int]] = None, recv_splits: Optional[Sequence[int]] = None,
                 out=None):
        """Rows of x to the ranks: without splits, x has size rows (len(x) % size == 0: size
        equal blocks) and block j goes to rank j; returns a new array (or ``out``) whose block j
        came from rank j. With splits (uneven, as torch's all_to_all_single): the first
        send_splits[j] rows after those of ranks < j go to rank j, and recv_splits[j] rows come
        from rank j; every pair must agree (rank j's send_splits[i] == rank i's recv_splits[j]),
        or every rank fails."""
        return self._alltoall(x, send_splits, recv_splits, out, blocking=True)

    def alltoall_async(self, x, send_splits=None, recv_splits=None, out=None) -> Work:
        return self._alltoall(x, send_splits, recv_splits, out, blocking=False)

    def send(self, x, dst: int, tag: int = 0) -> None:
        """Send x to rank dst (point to point, not collective). Messages between two ranks with one
        tag arrive in the order sent; the receiver must expect x's element count and dtype."""
        self.send_async(x, dst, tag).wait()

    def send_async(self, x, dst: int, tag: int = 0) -> Work:
        buf = _buffers.view(x, writable=False)
        self._check_peer(dst, "send to")
        return self._complete(self._live_core().send(buf.address, buf.count, buf.dtype_code, int(dst), self._tag(tag)),
                              None, (buf,), blocking=False)

    def recv(self, x, src: int = ANY_SOURCE, tag: int = 0):
        """Receive into x, in place, the next message from rank src with this tag; returns the
        rank it came from (as torch.distributed.recv). With src=ANY_SOURCE (as MPI's), the first
        message with this tag that any other rank sends, unless a receive posted earlier for that
        sender takes it."""
        work = self.recv_async(x, src, tag)
        work.wait()
        return work.source

    def recv_async(self, x, src: int = ANY_SOURCE, tag: int = 0) -> Work:
        """As recv; the Work's ``source`` says the sender once it is done."""
        buf = _buffers.view(x, writable=True)
        core, tag = self._live_core(), self._tag(tag)
        if src == ANY_SOURCE:
            if self.size < 2:
                raise ValueError("recv from any source: this communicator has no other rank")
            work = core.recv_any(buf.address, buf.count, buf.dtype_code, tag)
        else:
            self._check_peer(src, "recv from")
            work = core.recv(buf.address, buf.count, buf.dtype_code, int(src), tag)
        return self._complete(work, x, (buf,), blocking=False)

    # Each returns the result (blocking) or a Work (async). A blocking call lends the core its
    # thread: the collective runs on it when nothing else is queued (_complete).
    def _allreduce(self, x, op: str, blocking: bool):
        device = _device.find(x)
        if device is not None:
            return self._allreduce_staged(x, device, op, blocking)
        buf = _buffers.view(x, writable=True)
        code = op_code(op, buf.dtype)
        work = self._live_core().allreduce(buf.address, buf.count, buf.dtype_code, code, blocking)
        return self._complete(work, x, (buf,), blocking)

    def _allreduce_staged(self, x, device: _device.DeviceBuffer, op: str, blocking: bool):
        """A CUDA buffer, staged through pinned host memory piece by piece (_device.Staging):
        an async call returns before the copies are done."""
        code = op_code(op, device.dtype)
        work = self._staging.allreduce(self._live_core(), device, _core.DTYPES.index(device.dtype), code)
        return self._complete(work, x, (device,), blocking)

    def _allgather(self, x, blocking: bool):
        buf = _buffers.view(x, writable=False)
        out = _buffers.empty_like_kind(x, (self.size, *buf.shape), buf.dtype)
        out_buf = _buffers.view(out, writable=True, what="output")
        work = self._live_core().allgather(buf.address, out_buf.address, buf.count, buf.dtype_code, blocking)
        return self._complete(work, out, (buf, out_buf), blocking)

    def _broadcast(self, x, root: int, blocking: bool):
        self._check_root(root)
        buf = _buffers.view(x, writable=True)
        work = self._live_core().broadcast(buf.address, buf.count, buf.dtype_code, root, blocking)
        return self._complete(work, x, (buf,), blocking)

    def _reduce_scatter(self, x, op: str, blocking: bool):
        buf = _buffers.view(x, writable=False)
        code = op_code(op, buf.dtype)
        rows = buf.shape[0] if buf.shape else buf.count
        if rows % self.size:
            raise ValueError(
                f"reduce_scatter needs len(x) divisible by the communicator size: len(x) = {rows}, "
                f"size = {self.size}; pad x to a multiple of {self.size}"
            )
        part_shape = (rows // self.size, *buf.shape[1:])
        out = _buffers.empty_like_kind(x, part_shape, buf.dtype)
        out_buf = _buffers.view(out, writable=True, what="output")
        work = self._live_core().reduce_scatter(buf.address, out_buf.address, out_buf.count, buf.dtype_code, code,
                                                blocking)
        return self._complete(work, out, (buf, out_buf), blocking)

    def _reduce(self, x, root: int, op: str, blocking: bool) -> Work:
        self._check_root(root)
        buf = _buffers.view(x, writable=True)
        code = op_code(op, buf.dtype)
        work = self._live_core().reduce(buf.address, buf.count, buf.dtype_code, code, int(root), blocking)
        return self._complete(work, x, (buf,), blocking)

    def _gather(self, x, root: int, blocking: bool) -> Work:
        self._check_root(root)
        buf = _buffers.view(x, writable=False)
        out = out_buf = None
        if self.rank == root:
            out = _buffers.empty_like_kind(x, (self.size, *buf.shape), buf.dtype)
            out_buf = _buffers.view(out, writable=True, what="output")
        work = self._live_core().gather(buf.address, out_buf.address if out_buf else 0, buf.count, buf.dtype_code,
                                        int(root), blocking)
        return self._complete(work, out, (buf, out_buf), blocking)

    def _scatter(self, rows, root: int, out, blocking: bool) -> Work:
        self._check_root(root)
        if rows is None and (self.rank == root or out is None):
            raise ValueError("scatter needs rows on the root, and rows or out on every other rank")
        rows_buf = _buffers.view(rows, writable=False, what="rows") if rows is not None else None
        if rows_buf is not None and (not rows_buf.shape or rows_buf.shape[0] != self.size):
            raise ValueError(f"scatter needs rows of shape (size, ...) = ({self.size}, ...), got {rows_buf.shape}")
        if out is None:
            out = _buffers.empty_like_kind(rows, rows_buf.shape[1:], rows_buf.dtype)
        out_buf = _buffers.view(out, writable=True, what="out")
        if rows_buf is not None and (rows_buf.dtype != out_buf.dtype or rows_buf.count != out_buf.count * self.size):
            raise ValueError(f"scatter's out must hold one row of rows ({rows_buf.count // self.size} x "
                             f"{rows_buf.dtype}), got {out_buf.count} x {out_buf.dtype}")
        work = self._live_core().scatter(rows_buf.address if rows_buf and self.rank == root else 0, out_buf.address,
                                         out_buf.count, out_buf.dtype_code, int(root), blocking)
        return self._complete(work, out, (rows_buf, out_buf), blocking)

    def _alltoall(self, x, send_splits, recv_splits, out, blocking: bool) -> Work:
        buf = _buffers.view(x, writable=False)
        rows = buf.shape[0] if buf.shape else buf.count
        row = int(np.prod(buf.shape[1:], dtype=np.int64)) if len(buf.shape) > 1 else 1
        if send_splits is None and recv_splits is None:
            if rows % self.size:
                raise ValueError(f"alltoall without splits needs len(x) divisible by the communicator size: "
                                 f"len(x) = {rows}, size = {self.size}")
            send_splits = recv_splits = [rows // self.size] * self.size
        elif send_splits is None or recv_splits is None:
            raise ValueError("alltoall takes both send_splits and recv_splits, or neither")
        send_splits, recv_splits = [int(n) for n in send_splits], [int(n) for n in recv_splits]
        for name, splits in (("send_splits", send_splits), ("recv_splits", recv_splits)):
            if len(splits) != self.size or any(n < 0 for n in splits):
                raise ValueError(f"alltoall's {name} needs {self.size} counts >= 0, got {splits}")
        if sum(send_splits) != rows:
            raise ValueError(f"alltoall's send_splits add up to {sum(send_splits)} rows, but x has {rows}")
        if out is None:
            out = _buffers.empty_like_kind(x, (sum(recv_splits), *buf.shape[1:]), buf.dtype)
        out_buf = _buffers.view(out, writable=True, what="out")
        if out_buf.count != sum(recv_splits) * row or out_buf.dtype != buf.dtype:
            raise ValueError(f"alltoall's out must hold {sum(recv_splits) * row} x {buf.dtype}, got "
                             f"{out_buf.count} x {out_buf.dtype}")
        work = self._live_core().alltoall(buf.address, [n * row for n in send_splits], out_buf.address,
                                          [n * row for n in recv_splits], buf.dtype_code, blocking)
        return self._complete(work, out, (buf, out_buf), blocking)

    # -- lifetime -----------------------------------------------------------------------------
    def abort(self) -> None:
        """Local: every waiter on this rank wakes with CollectiveError; peers are told."""
        if self._owned_here():
            self._core.abort(f"rank {self.rank} called abort()")

    def close(self) -> None:
        """Local and idempotent: tell peers goodbye, close the connections and the store."""
        if not self._owned_here():
            return
        core, self._core = self._core, None
        _live.discard(self)
        try:
            core.close()
        finally:
            self._staging.close()  # after the core: what it still queued has failed
        self._pending.clear()
        if self._boot is not None:
            self._boot.close()

    def __del__(self) -> None:
        # Collected together with unfinished collectives (a cycle through their Works): stop
        # the core before the buffers those Works hold can be freed.
        if self._core is not None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing can be raised from here
                logger.exception("closing %r on collection failed", self)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._core is None else "open"
        return f"<collectives.Communicator rank {self.rank} of {self.size}, {state}>"

    # -- internals ----------------------------------------------------------------------------
    def _owned_here(self) -> bool:
        # A forked child (a DataLoader worker) shares the parent's sockets: it must never
        # close or use them, or it would break the parent's communicator.
        return self._core is not None and os.getpid() == self._pid

    def _live_core(self):
        if self._core is None:
            raise CollectiveError("the communicator is closed; create a new one with collectives.init()")
        if os.getpid() != self._pid:
            raise CollectiveError(
                "this communicator belongs to the parent process; a forked child must create its own"
            )
        return self._core

    def _complete(self, core_work: Any, result: Any, keep_alive: tuple, blocking: bool):
        """A blocking call's result, or an async call's Work. core_work is None where the
        collective ran on the caller's thread (and succeeded: the core raised otherwise)."""
        if core_work is None:
            return result
        work = Work(self, core_work, result, keep_alive)
        # Hold every unfinished collective, so its buffers outlive it even if the caller
        # drops the Work without waiting (held first, pruned after).
        self._pending.append(work)
        self._pending = [w for w in self._pending if w is work or not w.done()]
        return work.wait() if blocking else work

    def _interrupt(self) -> None:
        if self._owned_here():
            self._core.abort(f"rank {self.rank} was interrupted (KeyboardInterrupt)")
            for work in self._pending:
                try:
                    while not work._core_work.wait_for(_WAIT_SLICE_SECONDS):
                        pass
                except CollectiveError:
                    pass

    def _check_peer(self, peer: int, what: str) -> None:
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"{what} rank {peer!r}: not another rank of this {self.size}-rank communicator "
                             f"(this is rank {self.rank})")

    @staticmethod
    def _tag(tag: int) -> int:
        if not isinstance(tag, (int, np.integer)) or not 0 <= tag < 2**32:
            raise ValueError(f"a message's tag is an int in [0, 2**32), not {tag!r}")
        return int(tag)

    def _check_root(self, root: int) -> None:
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root {root!r} is not a rank of this {self.size}-rank communicator")


_SUBGROUP_ALGORITHMS = ("auto", "ring", "recursive_doubling", "hierarchical")


def _hierarchy(config: Config, topology: Sequence[str]) -> Optional[hierarchical.Plan]:
    """The hierarchical plan allreduce may run: forced (COLLECTIVES_ALGORITHM=hierarchical; on
    one host, a ring inside it), or a candidate of auto where ranks share hosts or racks."""
    algorithm = config.effective_algorithm
    if algorithm not in ("hierarchical", "auto") or len(topology) < 2:
        return None
    plan = hierarchical.plan(topology)
    return plan if plan.shares or (algorithm == "hierarchical" and plan.levels) else None


def _reducer_plan(config: Config, rank: int, topology: Sequence[str]) -> Optional[HostPlan]:
    """The reduction server's plan (host_plan), where allreduce goes through the reducers; rank 0
    says why the flat plan runs: a warning where ranks share hosts of different sizes (the host
    plan would have paid), else for the log."""
    if config.effective_algorithm != "reduction_server":
        return None
    plan = host_plan(topology) if config.rs_plan == "auto" else HostPlan(None, "COLLECTIVES_RS_PLAN=flat")
    if plan.hosts is None and rank == 0:
        uneven = 1 < len(set(topology)) < len(topology)
        logger.log(logging.WARNING if uneven else logging.INFO, "reduction server: %s: the flat plan runs (every "
                   "worker exchanges its whole buffer with the reducers)", plan.why_flat)
    return plan


def _options(config: Config, plan: Optional[hierarchical.Plan] = None, reducer_plan: Optional[HostPlan] = None) -> Any:
    """The core's options for a communicator of `config`, with `plan` (_hierarchy) and
    `reducer_plan` (_reducer_plan) if any."""
    options = _core.Options()
    options.timeout_seconds = config.timeout
    options.segment_bytes = config.ring_segment_bytes or 0
    options.debug = config.debug
    options.reduction_server = config.effective_algorithm == "reduction_server"
    options.cost_alpha_seconds, options.cost_beta_seconds_per_byte = ring.cost(config.algorithm)
    if config.effective_algorithm != "auto" or plan is not None:
        options.board_up_to_bytes = 0  # the host's board is auto's, where no plan of levels was asked for
    if plan is not None:
        forced = config.effective_algorithm == "hierarchical"
        options.hierarchy = hierarchical.core_plan(
            plan, network_cost=(options.cost_alpha_seconds, options.cost_beta_seconds_per_byte), forced=forced,
            host_over_shm=config.transport in ("auto", "shm"))
        if forced:  # flat links of a second per message against levels that cost nothing
            options.cost_alpha_seconds, options.cost_beta_seconds_per_byte = 1.0, 1.0
    options.rs_chunk_bytes = config.rs_chunk_bytes or 0
    options.rs_inflight = config.rs_inflight or 0
    options.rs_heartbeat_timeout = config.rs_heartbeat_timeout
    options.rs_fallback_ring = config.rs_fallback == "ring"
    if reducer_plan is not None and reducer_plan.hosts:
        options.rs_hosts = reducer_plan.hosts
    return options


# Communicators alive in this process: closed at exit (so that peers see a goodbye, not a
# lost connection) and disowned in forked children.
_live: "weakref.WeakSet[Communicator]" = weakref.WeakSet()
# The core objects whose address an extension holds (Communicator.c_handle): kept, closed,
# until the process ends, so that a handle outliving its communicator reaches a closed one
# (which refuses every collective) and never freed memory. A closed core holds no connection
# and no thread.
_cores_handed_to_extensions: set = set()


def _close_all_at_exit() -> None:
    for comm in list(_live):
        try:
            comm.close()
        except Exception:  # exit must go on; the peers see the connection end instead
            logger.exception("closing %r at exit failed", comm)


def _disown_in_child() -> None:
    # The child must never destroy its copy of a parent's core object, nor of its staging
    # pipelines: that would join threads that do not exist in the child, and say goodbye on the
    # parent's sockets. One reference that is never dropped keeps each alive until the child
    # exits, even through interpreter finalisation.
    for comm in list(_live):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(comm._core))
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(comm._staging))
    _live.clear()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_disown_in_child)


def init(
    rank: Optional[int] = None,
    size: Optional[int] = None,
    rendezvous: Optional[str] = None,
    algorithm: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Communicator:
    """A communicator among this job's workers.

    With no arguments, reads the launcher's environment: mpirun (OpenMPI, MPICH), torchrun,
    or COLLECTIVES_RANK/SIZE/RENDEZVOUS. With nothing set, a size-1 communicator. Reducers
    (collectives-reducer) in the mpirun job, or COLLECTIVES_NUM_REDUCERS of them started on
    their own, serve allreduce (algorithm "auto" or "reduction_server").
    """
    overrides = {"algorithm": algorithm, "timeout": timeout}
    config = Config.from_env({k: v for k, v in overrides.items() if v is not None})
    if config.debug and not logger.handlers:
        # COLLECTIVES_DEBUG=1: start-up steps here, each collective's phases from the core.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[collectives %(process)d] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    boot = bootstrap(rank=rank, size=size, rendezvous=rendezvous, config=config)
    try:
        return Communicator(boot, config)
    except BaseException:
        boot.close()
        raise
