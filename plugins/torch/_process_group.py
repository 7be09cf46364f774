"""The "collectives" backend of torch.distributed: a ProcessGroup in Python over a collectives
Communicator."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import secrets
import time
import weakref
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

import collectives as cc
from collectives._bootstrap import bootstrap_with_store
from collectives._config import Config
from collectives._launch import NO_SECRET, read_secret, torchrun_rendezvous
from collectives.errors import TimeoutError

from ._work import Completer, Step, Work, in_place, to_host

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
        return self._start(tensors, [in_place(t, lambda x: self._comm.allreduce_async(x, op)) for t in tensors])

    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts: Any = None) -> Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: List[torch.Tensor], opts: Any = None) -> Work:
        root = 0 if opts is None else opts.rootRank
        return self._start(tensors, [in_place(t, lambda x: self._comm.broadcast_async(x, root)) for t in tensors])

    def allgather(self, output_tensors: List[List[torch.Tensor]], input_tensors: List[torch.Tensor],
                  opts: Any = None) -> Work:
        return self._start(output_tensors, self._allgather_steps(output_tensors, input_tensors))

    def allgather_coalesced(self, output_lists: List[List[torch.Tensor]], input_list: List[torch.Tensor],
                            opts: Any = None) -> Work:
        # torch lays the outputs out [rank][input]; allgather's are [input][rank].
        _check_count(len(output_lists), self._comm.size, "allgather_coalesced needs one output list per rank")
        by_input = [[outputs[i] for outputs in output_lists] for i in range(len(input_list))]
        return self._start(output_lists, self._allgather_steps(by_input, input_list))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:  # noqa: A002
        return self._start([output], [self._gather_into(output, input)])

    def all_gather_single_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor],
                                    opts: Any = None) -> Work:
        return self._start(outputs, [self._gather_into(o, i) for o, i in zip(outputs, inputs)])

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
        return self._start(outputs, steps)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:  # noqa: A002
        return self._start([output], [self._scatter_into(output, input, _op(opts, "reduce_scatter_tensor"))])

    def reduce_scatter_single_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor],
                                        opts: Any = None) -> Work:
        op = _op(opts, "reduce_scatter_tensor")
        return self._start(outputs, [self._scatter_into(o, i, op) for o, i in zip(outputs, inputs)])

    def barrier(self, opts: Any = None) -> Work:
        return self._start([], [(self._comm.barrier_async(), None)])

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
    def _start(self, result: Any, steps: List[Step]) -> Work:
        return Work(self._completer.future(steps, result))

    def _allgather_steps(self, output_tensors: List[List[torch.Tensor]],
                         input_tensors: List[torch.Tensor]) -> List[Step]:
        """output_tensors[i][r] receives rank r's input_tensors[i]."""
        steps = []
        for outputs, tensor in zip(output_tensors, input_tensors):
            _check_count(len(outputs), self._comm.size, "allgather needs one output tensor per rank")
            for output in outputs:
                _check_count(output.numel(), tensor.numel(), "allgather needs output tensors of the input's size")
                _check_dtype(output, tensor, "allgather")
            steps.append(self._gather(tensor, lambda rows, outputs=outputs: [o.copy_(r.view(o.shape))
                                                                             for o, r in zip(outputs, rows)]))
        return steps

    def _gather(self, tensor: torch.Tensor, finish: Callable[[torch.Tensor], Any]) -> Step:
        return self._comm.allgather_async(to_host(tensor)), finish

    def _gather_into(self, output: torch.Tensor, tensor: torch.Tensor) -> Step:
        _check_count(output.numel(), tensor.numel() * self._comm.size,
                     "all_gather_into_tensor needs an output of size * the input's elements")
        _check_dtype(output, tensor, "all_gather_into_tensor")
        return self._gather(tensor, lambda rows: output.copy_(rows.view(output.shape)))

    def _scatter_into(self, output: torch.Tensor, tensor: torch.Tensor, op: str) -> Step:
        _check_count(tensor.numel(), output.numel() * self._comm.size,
                     "reduce_scatter_tensor needs an input of size * the output's elements")
        _check_dtype(output, tensor, "reduce_scatter")
        rows = to_host(tensor).reshape(self._comm.size, -1)
        return self._comm.reduce_scatter_async(rows, op), lambda part: output.copy_(part.view(output.shape))


def _unsupported(name: str) -> Callable[..., Work]:
    def method(self: ProcessGroup, *args: Any, **kwargs: Any) -> Work:
        raise NotImplementedError(
            f"collectives' torch backend does not implement {name}; it has allreduce, broadcast, allgather, "
            "all_gather_into_tensor, reduce_scatter(_tensor), barrier and their coalesced forms. Run "
            f"{name} on another process group, e.g. dist.new_group(backend='gloo')")
    method.__name__ = name
    return method


for _name in ("reduce", "gather", "scatter", "alltoall", "all_to_all_single", "alltoall_base", "send", "recv",
              "recv_anysource"):
    setattr(ProcessGroup, _name, _unsupported(_name))


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
    if secret is None:
        if size > 1 or config.num_reducers:
            raise ValueError(NO_SECRET)
        secret = secrets.token_bytes(32)
    boot = bootstrap_with_store(_StoreAdapter(store), rank, size, secret, config, toward=_store_host(store),
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


class _StoreAdapter:
    """A torch.distributed Store as collectives' bootstrap uses a store: its errors become
    CollectiveError, a missing key collectives' TimeoutError."""

    # How often get() looks for its key: torch's timed wait() logs a warning at every timeout.
    _POLL_S = (0.001, 0.05)

    def __init__(self, store: dist.Store):
        self._store = store

    def set(self, key: str, value: bytes) -> None:
        self._call(self._store.set, key, value)

    def get(self, key: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        pause = self._POLL_S[0]
        while not self.check([key]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{key} was not set in the torch.distributed store within {timeout:g} s")
            time.sleep(min(pause, remaining))
            pause = min(2 * pause, self._POLL_S[1])
        return self._call(self._store.get, key)

    def add(self, key: str, amount: int) -> int:
        return self._call(self._store.add, key, amount)

    def check(self, keys: List[str]) -> bool:
        return self._call(self._store.check, keys)

    def close(self) -> None:
        pass  # torch.distributed owns its store

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except RuntimeError as e:  # torch's DistStoreError, or a FileStore's error
            raise cc.CollectiveError(f"the torch.distributed store failed: {e}") from e
