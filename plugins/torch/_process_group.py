"""The "collectives" backend of torch.distributed: a ProcessGroup in Python over a collectives
Communicator."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import secrets
import threading
import time
import weakref
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

import collectives as cc
from collectives._bootstrap import bootstrap_with_store
from collectives._config import Config
from collectives._launch import NO_SECRET, SECRET_BYTES, read_secret, torchrun_rendezvous
from collectives._torch_store import TorchStore, secret_through_store

from ._work import (Completer, MessageWork, Step, Work, as_bytes_if_needed, from_bytes, in_place, moved, reduced,
                    unreduced)

__all__ = ["ProcessGroup", "BACKEND"]

BACKEND = "collectives"

log = logging.getLogger("collectives")

_OPS = ((ReduceOp.SUM, "sum"), (ReduceOp.AVG, "avg"), (ReduceOp.MIN, "min"), (ReduceOp.MAX, "max"),
        (ReduceOp.PRODUCT, "prod"))
# The reducers serve one process group at a time: the first that spans the whole job.
_reducers_held_by: Optional["ProcessGroup"] = None
# The group that spans the job (made by init_process_group): new_group makes its subgroups.
_world: Optional["weakref.ReferenceType[ProcessGroup]"] = None


class ProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on a collectives
    :class:`~collectives.Communicator` (ring, or reducers). Made by
    ``dist.init_process_group("collectives")`` and ``dist.new_group(backend="collectives")``;
    it owns the communicator and closes it at ``dist.destroy_process_group()``."""

    def __init__(self, comm: cc.Communicator):
        super().__init__(comm.rank, comm.size)
        self._comm = comm
        self._group_name = self._group_desc = ""
        self._completer = Completer(f"collectives-torch-rank{comm.rank}")

    @property
    def communicator(self) -> cc.Communicator:
        return self._comm

    # torch's names; torch keeps a Python group's name and description nowhere else.
    def getBackendName(self) -> str:  # noqa: N802
        return BACKEND

    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    def __repr__(self) -> str:
        return f"<collectives.torch.ProcessGroup rank {self._comm.rank} of {self._comm.size}, {self._comm.algorithm}>"

    # -- collectives ----------------------------------------------------------------------------
    def allreduce(self, tensors: List[torch.Tensor], opts: Any = None) -> Work:
        op = _op(opts, "allreduce")
        steps = []
        for t in tensors:
            if t.is_sparse:
                steps.append(self._sparse_allreduce(t, op))
            else:
                steps.append(in_place(t, op, "allreduce", self._comm.allreduce_async))
        return self._start(tensors, steps, "all_reduce", tensors)

    def _sparse_allreduce(self, tensor: torch.Tensor, op: str) -> Step:
        """As gloo: the sum of every rank's sparse tensor, coalesced, in place of ``tensor``.
        Reduced densely (simple and exact; as much memory as the dense tensor)."""
        if op != "sum":
            raise NotImplementedError(f"collectives' torch backend reduces sparse tensors with ReduceOp.SUM only, not {op}")
        dense = tensor.to_dense()
        buffer, mapped, _ = reduced(dense, op, "allreduce")
        return (self._comm.allreduce_async(buffer, mapped),
                lambda _: tensor.copy_(buffer.view(dense.shape).to_sparse(tensor.sparse_dim()).coalesce()))

    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts: Any = None) -> Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: List[torch.Tensor], opts: Any = None) -> Work:
        root = 0 if opts is None else opts.rootRank
        steps = []
        for t in tensors:
            flat, finish = moved(t)
            steps.append((self._comm.broadcast_async(flat, root), finish))
        return self._start(tensors, steps, "broadcast", tensors)

    def allgather(self, output_tensors: List[List[torch.Tensor]], input_tensors: List[torch.Tensor],
                  opts: Any = None) -> Work:
        return self._start(output_tensors, self._allgather_steps(output_tensors, input_tensors), "all_gather",
                           input_tensors)

    def allgather_coalesced(self, output_lists: List[List[torch.Tensor]], input_list: List[torch.Tensor],
                            opts: Any = None) -> Work:
        # torch lays the outputs out [rank][input]; allgather's are [input][rank].
        _check_count(len(output_lists), self._comm.size, "allgather_coalesced needs one output list per rank")
        by_input = [[outputs[i] for outputs in output_lists] for i in range(len(input_list))]
        return self._start(output_lists, self._allgather_steps(by_input, input_list), "all_gather", input_list)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:  # noqa: A002
        return self._start([output], [self._gather_into(output, input)], "all_gather_into_tensor", [input])

    def all_gather_single_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor],
                                    opts: Any = None) -> Work:
        return self._start(outputs, [self._gather_into(o, i) for o, i in zip(outputs, inputs)], "all_gather_into_tensor",
                           inputs)

    def reduce_scatter(self, outputs: List[torch.Tensor], input_lists: List[List[torch.Tensor]],
                       opts: Any = None) -> Work:
        op = _op(opts, "reduce_scatter")
        steps = []
        for output, inputs in zip(outputs, input_lists):
            _check_count(len(inputs), self._comm.size, "reduce_scatter needs one input tensor per rank")
            for tensor in inputs:
                _check_count(tensor.numel(), output.numel(),
                             "reduce_scatter needs input tensors of the output's size")
            steps.append(self._scatter_into(output, torch.cat([t.reshape(-1) for t in inputs]), op))
        return self._start(outputs, steps, "reduce_scatter", [t for inputs in input_lists for t in inputs])

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:  # noqa: A002
        return self._start([output], [self._scatter_into(output, input, _op(opts, "reduce_scatter_tensor"))],
                           "reduce_scatter_tensor", [input])

    def reduce_scatter_single_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor],
                                        opts: Any = None) -> Work:
        op = _op(opts, "reduce_scatter_tensor")
        return self._start(outputs, [self._scatter_into(o, i, op) for o, i in zip(outputs, inputs)],
                           "reduce_scatter_tensor", inputs)

    def barrier(self, opts: Any = None) -> Work:
        return self._start([], [(self._comm.barrier_async(), None)], "barrier", [])

    def reduce(self, tensors: List[torch.Tensor], opts: Any = None) -> Work:
        op = _op(opts, "reduce")
        root = 0 if opts is None else opts.rootRank
        return self._start(tensors, [in_place(t, op, "reduce", lambda x, o: self._comm.reduce_async(x, root, o))
                                     for t in tensors], "reduce", tensors)

    def gather(self, output_tensors: List[List[torch.Tensor]], input_tensors: List[torch.Tensor],
               opts: Any = None) -> Work:
        root = 0 if opts is None else opts.rootRank
        _check_count(len(input_tensors), 1, "gather takes one input tensor")
        tensor = input_tensors[0]
        outputs = output_tensors[0] if self._comm.rank == root else []
        if self._comm.rank == root:
            _check_count(len(output_tensors), 1, "gather takes one list of output tensors on the root")
            _check_count(len(outputs), self._comm.size, "gather needs one output tensor per rank")
            for output in outputs:
                _check_count(output.numel(), tensor.numel(), "gather needs output tensors of the input's size")
                _check_dtype(output, tensor, "gather")

        def finish(rows: Any) -> None:
            for output, row in zip(outputs, rows if rows is not None else []):
                output.copy_(from_bytes(row, output))

        return self._start(output_tensors, [(self._comm.gather_async(as_bytes_if_needed(tensor), root), finish)],
                           "gather", input_tensors)

    def scatter(self, output_tensors: List[torch.Tensor], input_tensors: List[List[torch.Tensor]],
                opts: Any = None) -> Work:
        root = 0 if opts is None else opts.rootRank
        _check_count(len(output_tensors), 1, "scatter takes one output tensor")
        output = output_tensors[0]
        flat, finish = moved(output)
        rows = None
        if self._comm.rank == root:
            _check_count(len(input_tensors), 1, "scatter takes one list of input tensors on the root")
            _check_count(len(input_tensors[0]), self._comm.size, "scatter needs one input tensor per rank")
            for tensor in input_tensors[0]:
                _check_count(tensor.numel(), output.numel(), "scatter needs input tensors of the output's size")
                _check_dtype(output, tensor, "scatter")
            rows = torch.stack([as_bytes_if_needed(t) for t in input_tensors[0]])
        return self._start(output_tensors, [(self._comm.scatter_async(rows, root, out=flat), finish)], "scatter",
                           input_tensors[0] if rows is not None else [])

    def alltoall(self, output_tensors: List[torch.Tensor], input_tensors: List[torch.Tensor],
                 opts: Any = None) -> Work:
        _check_count(len(input_tensors), self._comm.size, "all_to_all needs one input tensor per rank")
        _check_count(len(output_tensors), self._comm.size, "all_to_all needs one output tensor per rank")
        for output, tensor in zip(output_tensors, input_tensors):
            _check_dtype(output, tensor, "all_to_all")
        flats = [as_bytes_if_needed(t) for t in input_tensors]
        x = torch.cat(flats) if flats else torch.empty(0)
        recv = [as_bytes_if_needed(o).numel() for o in output_tensors]

        def finish(out: torch.Tensor) -> None:
            for output, part in zip(output_tensors, torch.split(out, recv)):
                output.copy_(from_bytes(part, output))

        return self._start(output_tensors, [(self._comm.alltoall_async(x, [f.numel() for f in flats], recv), finish)],
                           "all_to_all", input_tensors)

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: List[int],  # noqa: A002
                      input_split_sizes: List[int], opts: Any = None) -> Work:
        _check_dtype(output, input, "all_to_all_single")
        n = self._comm.size
        x, out = as_bytes_if_needed(input), as_bytes_if_needed(output)
        # Splits are rows of dim 0; the core counts elements of the flat buffers.
        send_row = x.numel() // input.shape[0] if input.dim() and input.shape[0] else 0
        recv_row = out.numel() // output.shape[0] if output.dim() and output.shape[0] else 0
        if not input_split_sizes:
            _check_count(input.shape[0] % n if input.dim() else 1, 0, "all_to_all_single without splits needs "
                         "input.shape[0] divisible by the group size; remainder")
            input_split_sizes = [input.shape[0] // n] * n
        if not output_split_sizes:
            _check_count(output.shape[0] % n if output.dim() else 1, 0, "all_to_all_single without splits needs "
                         "output.shape[0] divisible by the group size; remainder")
            output_split_sizes = [output.shape[0] // n] * n
        flat, finish = moved(output)
        work = self._comm.alltoall_async(x, [s * send_row for s in input_split_sizes],
                                         [s * recv_row for s in output_split_sizes], out=flat)
        return self._start([output], [(work, finish)], "all_to_all", [input])

    def send(self, tensors: List[torch.Tensor], dstRank: int, tag: int = 0) -> MessageWork:  # noqa: N803
        _check_count(len(tensors), 1, "send takes one tensor")
        flat = as_bytes_if_needed(tensors[0])
        return MessageWork(self._comm.send_async(flat, dstRank, tag), None, tensors, self._profiled("send", tensors))

    def recv(self, tensors: List[torch.Tensor], srcRank: int, tag: int = 0) -> MessageWork:  # noqa: N803
        _check_count(len(tensors), 1, "recv takes one tensor")
        flat, finish = moved(tensors[0])
        return MessageWork(self._comm.recv_async(flat, srcRank, tag), finish, tensors, self._profiled("recv", tensors),
                           source=lambda: srcRank)

    def recv_anysource(self, tensors: List[torch.Tensor], tag: int = 0) -> MessageWork:
        _check_count(len(tensors), 1, "recv takes one tensor")
        flat, finish = moved(tensors[0])
        work = self._comm.recv_async(flat, cc.ANY_SOURCE, tag)
        return MessageWork(work, finish, tensors, self._profiled("recvAnySource", tensors), source=lambda: work.source)

    def monitored_barrier(self, timeout: Optional[datetime.timedelta] = None, wait_all_ranks: bool = False) -> None:
        """As gloo's: every rank checks in with rank 0, which answers once all have; rank 0 raises
        naming the first rank (or, with wait_all_ranks, every rank) that did not check in within
        ``timeout``, and the others time out waiting for its answer."""
        seconds = timeout.total_seconds() if timeout is not None else self._comm.config.timeout
        millis = int(seconds * 1000)
        me, n = self._comm.rank, self._comm.size
        token = torch.zeros(1, dtype=torch.uint8)
        if me != 0:
            self._comm.send_async(token, 0, _MONITORED_BARRIER_TAG).wait(seconds)
            try:
                self._comm.recv_async(torch.zeros(1, dtype=torch.uint8), 0, _MONITORED_BARRIER_TAG).wait(seconds)
            except TimeoutError:
                raise RuntimeError(f"Rank {me} successfully reached monitoredBarrier, but received errors while waiting "
                                   f"for send/recv from rank 0 (no answer within {millis} ms)") from None
            return
        deadline = time.monotonic() + seconds
        arrivals = [(r, self._comm.recv_async(torch.zeros(1, dtype=torch.uint8), r, _MONITORED_BARRIER_TAG))
                    for r in range(1, n)]
        missing, processed = [], []
        for r, work in arrivals:
            remaining = deadline - time.monotonic()
            if remaining < 0 and not wait_all_ranks:  # as gloo: the time was spent before this rank's turn
                raise RuntimeError(f"Rank {me} timed out in monitoredBarrier after {millis} ms.\n" + (
                    f"Successfully processed ranks: {', '.join(map(str, processed))}" if processed
                    else "No ranks successfully processed in monitoredBarrier."))
            try:
                work.wait(max(0.0, remaining))
                processed.append(r)
            except TimeoutError:
                missing.append(r)
                if not wait_all_ranks:
                    break
        if missing:
            if wait_all_ranks:
                raise RuntimeError(f"Ranks {', '.join(map(str, missing))} failed to pass monitoredBarrier in "
                                   f"{millis} ms")
            raise RuntimeError(f"Rank {missing[0]} failed to pass monitoredBarrier in {millis} ms")
        for r in range(1, n):
            self._comm.send_async(token, r, _MONITORED_BARRIER_TAG).wait(seconds)

    # -- lifetime -------------------------------------------------------------------------------
    def abort(self) -> None:
        self._comm.abort()

    def shutdown(self) -> None:
        """Closes the communicator and ends the thread that completes futures (what
        dist.destroy_process_group() calls). Idempotent."""
        global _reducers_held_by, _world
        self._comm.close()
        self._completer.close()
        if _reducers_held_by is self:
            _reducers_held_by = None
        if _world is not None and _world() is self:
            _world = None

    # -- internals ------------------------------------------------------------------------------
    def _start(self, result: Any, steps: List[Step], title: str, inputs: List[torch.Tensor]) -> Work:
        return Work(self._completer.future(steps, result, self._profiled(title, inputs)))

    def _profiled(self, title: str, inputs: List[torch.Tensor]) -> Optional[Callable[[], None]]:
        """As gloo's ops: while torch's profiler runs, each op is an event "BACKEND:title" (the
        name torch.distributed knows this group's backend by) with its input tensors' shapes,
        from its start until it is done (an async event); what ends it, or None."""
        if not torch.autograd._profiler_enabled():
            return None
        try:
            backend = dist.get_backend(self)
        except (ValueError, RuntimeError):  # a group made by hand, which torch does not know
            backend = BACKEND
        record = torch._C._autograd._record_function_with_args_enter(f"{backend}:{title}", *inputs)
        started_on = threading.get_ident()

        def end() -> None:
            if threading.get_ident() != started_on:
                torch._C._autograd._record_function_with_args_exit(record)
                return
            # A message is ended by whoever waits on it, often the thread that started it: the
            # profiler takes an event for async only if another thread ends it.
            ender = threading.Thread(target=torch._C._autograd._record_function_with_args_exit, args=(record,))
            ender.start()
            ender.join()

        return end

    def _allgather_steps(self, output_tensors: List[List[torch.Tensor]],
                         input_tensors: List[torch.Tensor]) -> List[Step]:
        """output_tensors[i][r] receives rank r's input_tensors[i]."""
        steps = []
        for outputs, tensor in zip(output_tensors, input_tensors):
            _check_count(len(outputs), self._comm.size, "allgather needs one output tensor per rank")
            for output in outputs:
                _check_count(output.numel(), tensor.numel(), "allgather needs output tensors of the input's size")
                _check_dtype(output, tensor, "allgather")
            steps.append(self._gather(tensor, lambda rows, outputs=outputs: [o.copy_(from_bytes(r, o))
                                                                             for o, r in zip(outputs, rows)]))
        return steps

    def _gather(self, tensor: torch.Tensor, finish: Callable[[torch.Tensor], Any]) -> Step:
        return self._comm.allgather_async(as_bytes_if_needed(tensor)), finish

    def _gather_into(self, output: torch.Tensor, tensor: torch.Tensor) -> Step:
        _check_count(output.numel(), tensor.numel() * self._comm.size,
                     "all_gather_into_tensor needs an output of size * the input's elements")
        _check_dtype(output, tensor, "all_gather_into_tensor")
        return self._gather(tensor, lambda rows: output.copy_(from_bytes(rows.reshape(-1), output)))

    def _scatter_into(self, output: torch.Tensor, tensor: torch.Tensor, op: str) -> Step:
        _check_count(tensor.numel(), output.numel() * self._comm.size,
                     "reduce_scatter_tensor needs an input of size * the output's elements")
        _check_dtype(output, tensor, "reduce_scatter")
        buffer, mapped, _ = reduced(tensor, op, "reduce_scatter")
        rows = buffer.reshape(self._comm.size, -1)
        return self._comm.reduce_scatter_async(rows, mapped), lambda part: output.copy_(unreduced(part, output))


# Above any tag a user's send/recv is likely to take (torch's tags are ints from 0).
_MONITORED_BARRIER_TAG = 2**32 - 2


def _op(opts: Any, collective: str) -> str:
    """The collectives op of torch's ReduceOp in ``opts`` (SUM when there are none)."""
    if opts is None:
        return "sum"
    for torch_op, name in _OPS:
        if opts.reduceOp == torch_op:
            return name
    raise NotImplementedError(f"collectives' torch backend does not implement {collective} with "
                              f"{opts.reduceOp.op if hasattr(opts.reduceOp, 'op') else opts.reduceOp}; "
                              "it has ReduceOp.SUM, AVG, MIN, MAX and PRODUCT")


def _check_count(count: int, expected: int, what: str) -> None:
    if count != expected:
        raise ValueError(f"{what}: got {count}, expected {expected}")


def _check_dtype(output: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if output.dtype != tensor.dtype:
        raise TypeError(f"{what} needs the output tensors in the input's dtype: got {output.dtype}, "
                        f"expected {tensor.dtype}")


# -- the backend's creator ----------------------------------------------------------------------
def create(options: Any, pg_options: Any) -> ProcessGroup:
    """What torch.distributed calls (extended API) to make a group of this backend: bootstraps
    the group's workers over the torch store it is handed, or, given a Communicator as
    ``pg_options``, wraps that one."""
    global _reducers_held_by
    if pg_options is not None:
        if not isinstance(pg_options, cc.Communicator):
            raise TypeError(f"pg_options of the collectives backend must be a collectives.Communicator (or None), "
                            f"not {type(pg_options).__name__}")
        if (pg_options.rank, pg_options.size) != (options.group_rank, options.group_size):
            raise ValueError(f"the communicator is rank {pg_options.rank} of {pg_options.size}, but the group "
                             f"wants rank {options.group_rank} of {options.group_size}")
        group = ProcessGroup(pg_options)
        if pg_options.config.num_reducers:
            _reducers_held_by = group
        return group
    global _world
    ranks = options.global_ranks_in_group
    # Only the group that spans the whole job can use its reducers (and only one at a time).
    spans_job = not ranks or len(ranks) == dist.get_world_size()
    world = _world() if _world is not None else None
    if ranks and world is not None and world.communicator.size == dist.get_world_size():
        # new_group: over the connections of the group that spans the job, with no new
        # bootstrap (torch calls this on the group's members only, in the same order on each).
        return ProcessGroup(world.communicator.create_group(ranks))
    comm = _bootstrap(options.store, options.group_rank, options.group_size, options.timeout,
                      with_reducers=spans_job and _reducers_held_by is None)
    group = ProcessGroup(comm)
    if comm.config.num_reducers:
        _reducers_held_by = group
    if spans_job:
        _world = weakref.ref(group)
    return group


def _bootstrap(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta, *,
               with_reducers: bool) -> cc.Communicator:
    env = os.environ
    config = Config.from_env({"timeout": timeout.total_seconds()})
    reducer_rendezvous = None
    if config.num_reducers and not with_reducers:
        log.info("collectives: this process group runs without the job's reducers, which serve the first group "
                 "that spans every rank")
        config = dataclasses.replace(config, num_reducers=0)
    elif config.num_reducers:
        reducer_rendezvous = env.get("COLLECTIVES_RENDEZVOUS") or None
        if reducer_rendezvous is None and "MASTER_ADDR" in env and "MASTER_PORT" in env:
            reducer_rendezvous = torchrun_rendezvous(env)
        if reducer_rendezvous is None:
            raise ValueError(f"COLLECTIVES_NUM_REDUCERS={config.num_reducers} needs the address where the reducers "
                             "meet the job: set COLLECTIVES_RENDEZVOUS=HOST:PORT (rank 0's host and a free port) on "
                             "every worker, and start each reducer with `collectives-reducer --rendezvous HOST:PORT`")
    config.check_runnable()
    secret = read_secret(env)
    adapter = TorchStore(store)
    if secret is None:
        if config.num_reducers:
            raise ValueError(NO_SECRET + " (the reducers, started on their own, need it too)")
        secret = secret_through_store(adapter) if size > 1 else secrets.token_bytes(SECRET_BYTES)
    boot = bootstrap_with_store(adapter, rank, size, secret, config, toward=_store_host(store),
                                rendezvous="the torch.distributed store", reducer_rendezvous=reducer_rendezvous)
    try:
        return cc.Communicator(boot, config)
    except BaseException:
        boot.close()
        raise


def _store_host(store: dist.Store) -> Optional[str]:
    """The host of the TCP store under ``store`` (whose address reaches the other ranks)."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store.host if isinstance(store, dist.TCPStore) else None
