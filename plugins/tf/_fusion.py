"""A step's gradients all-reduced in fused buckets, asynchronously.

Dense gradients are packed, per dtype, into buckets of at most ``bucket_bytes`` (a larger
gradient is a bucket of its own), last variable first: backpropagation produces the last
layer's gradients first, so the first bucket is the first ready (as DDP orders its buckets).
Each bucket is two ops: the first packs it and starts its all-reduce, returning a handle; the
second waits for it. They are collectives.tf's custom ops where those are in use (the bucket
packed by tf.concat, reduced in place in that buffer, the wait holding no thread), numpy
functions otherwise (packed by numpy, started by the core's allreduce_async, waited on with
the GIL taken back at the end). Inside tf.function every bucket's start is an op that runs as soon as its gradients exist (and the previous start
has run: stateful ops keep program order, the order the core needs), so the all-reduce of
one bucket overlaps the backward pass of the layers below it and the packing of the next.

Sparse gradients (tf.IndexedSlices, e.g. of an embedding) follow one rule, the same on every
worker: the workers' row counts are all-gathered first; if gathering every worker's rows
(padded to the largest count) sends fewer rows than the dense gradient has, the rows and
their indices are all-gathered (values divided by the number of workers for "avg"; duplicate
indices add up when applied, as in any IndexedSlices); otherwise the gradient is densified
and all-reduced. Either way the result is an IndexedSlices, so that a tf.function's output
structure does not depend on the data.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

import collectives as cc

from . import _native
from ._context import communicator
from ._ops import concatenate, split_like

DEFAULT_BUCKET_BYTES = 25 * 2**20  # as DDP's bucket_cap_mb
GRADIENT_OPS = ("avg", "sum")

_lock = threading.Lock()
_in_flight: Dict[int, cc.Work] = {}
_handles = itertools.count()


def check_reduction(op: str, bucket_bytes: int) -> None:
    """ValueError for arguments that reduce_gradients cannot take, when they are given."""
    if op not in GRADIENT_OPS:
        raise ValueError(f"gradients are reduced with op 'avg' or 'sum', not {op!r}")
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive integer, not {bucket_bytes!r}")


def reduce_gradients(grads: Sequence[Optional[tf.Tensor]], op: str = "avg",
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> List[Optional[tf.Tensor]]:
    """``grads`` (tensors, IndexedSlices or None, in the variables' order) reduced over every
    worker, in the same order; None stays None."""
    check_reduction(op, bucket_bytes)
    grads = list(grads)
    comm = communicator()
    if comm.size == 1:
        return grads
    dense = [i for i in reversed(range(len(grads))) if grads[i] is not None
             and not isinstance(grads[i], tf.IndexedSlices)]
    buckets = _buckets([grads[i] for i in dense], bucket_bytes)
    started: List[Any] = []  # handles not yet finished
    reduced = list(grads)
    try:
        for bucket in buckets:
            started.append(_start(comm, [grads[dense[j]] for j in bucket], op))
        for i, grad in enumerate(grads):
            if isinstance(grad, tf.IndexedSlices):
                reduced[i] = _reduce_sparse(comm, grad, op)
        for bucket in buckets:
            members = [tf.convert_to_tensor(grads[dense[j]]) for j in bucket]
            flat = _finish(started[0], members)
            started.pop(0)
            for j, value in zip(bucket, split_like(flat, members)):
                reduced[dense[j]] = value
    except BaseException:
        if tf.executing_eagerly():  # in a graph the step's end forgets them (ops/collectives_ops.cc)
            _forget(started)
        raise
    return reduced


def _buckets(tensors: Sequence[tf.Tensor], bucket_bytes: int) -> List[List[int]]:
    """Indices into ``tensors``, in order, cut into runs of one dtype of at most bucket_bytes
    (a tensor of unknown size counts as a bucket of its own)."""
    buckets: List[List[int]] = []
    open_bucket: Dict[tf.DType, List[int]] = {}
    filled: Dict[tf.DType, int] = {}
    for i, tensor in enumerate(tensors):
        count = tensor.shape.num_elements()
        nbytes = bucket_bytes if count is None else count * tensor.dtype.size
        bucket = open_bucket.get(tensor.dtype)
        if bucket is None or filled[tensor.dtype] + nbytes > bucket_bytes:
            bucket = open_bucket[tensor.dtype] = []
            filled[tensor.dtype] = 0
            buckets.append(bucket)
        bucket.append(i)
        filled[tensor.dtype] += nbytes
    return buckets


def _start(comm: cc.Communicator, tensors: Sequence[tf.Tensor], op: str):
    """Packs the tensors and starts their all-reduce: the handle that _finish waits on."""
    if _native.ops():
        return _native.start(comm, tf.concat([tf.reshape(t, [-1]) for t in tensors], 0), "allreduce", op)

    def start(*arrays: np.ndarray) -> np.int64:
        work = comm.allreduce_async(concatenate(arrays), op=op)
        with _lock:
            handle = next(_handles)
            _in_flight[handle] = work
        return np.int64(handle)

    if tf.executing_eagerly():
        return start(*(t.numpy() for t in tensors))
    return tf.numpy_function(start, list(tensors), tf.int64, stateful=True)


def _finish(handle, members: Sequence[tf.Tensor]) -> tf.Tensor:
    """The reduced flat bucket that ``handle`` stands for, once its all-reduce is done."""
    def finish(handle: np.int64) -> np.ndarray:
        with _lock:
            work = _in_flight.pop(int(handle))
        return work.wait()

    if _native.ops():
        flat = _native.wait(handle, members[0].dtype)
    elif tf.executing_eagerly():
        return tf.convert_to_tensor(finish(handle))
    else:
        flat = tf.numpy_function(finish, [handle], members[0].dtype, stateful=True)
    count = sum(m.shape.num_elements() or 0 for m in members)
    static = all(m.shape.is_fully_defined() for m in members)
    return tf.ensure_shape(flat, [count if static else None])


def _forget(handles: Sequence[Any]) -> None:
    """Drops the started collectives that a failed eager step will not finish (the communicator
    holds their buffers until they end), rather than keep them, and their results, for ever."""
    for handle in handles:
        if _native.ops():
            _native.forget(handle)
        else:
            with _lock:
                _in_flight.pop(int(handle), None)


def _reduce_sparse(comm: cc.Communicator, grad: tf.IndexedSlices, op: str) -> tf.IndexedSlices:
    """See the module's docstring for the rule."""
    def reduce(indices: np.ndarray, values: np.ndarray, dense_shape: np.ndarray):
        rows = len(indices)
        counts = comm.allgather(np.array([rows], np.int64)).reshape(-1)
        most = int(counts.max())
        if comm.size * most < int(dense_shape[0]):
            padded_indices = np.zeros(most, np.int64)
            padded_indices[:rows] = indices
            padded_values = np.zeros((most, *values.shape[1:]), values.dtype)
            padded_values[:rows] = values
            all_indices = comm.allgather(padded_indices)
            all_values = comm.allgather(padded_values)
            keep = [slice(0, int(c)) for c in counts]
            indices = np.concatenate([all_indices[r][keep[r]] for r in range(comm.size)])
            values = np.concatenate([all_values[r][keep[r]] for r in range(comm.size)])
            if op == "avg":
                values = values / np.asarray(comm.size, values.dtype)
            return indices, values
        dense = np.zeros(tuple(int(d) for d in dense_shape), values.dtype)
        np.add.at(dense, indices, values)
        comm.allreduce(dense, op=op)
        return np.arange(len(dense), dtype=np.int64), dense

    inputs = [tf.cast(grad.indices, tf.int64), grad.values, tf.cast(grad.dense_shape, tf.int64)]
    if tf.executing_eagerly():
        indices, values = reduce(*(t.numpy() for t in inputs))
        indices, values = tf.convert_to_tensor(indices), tf.convert_to_tensor(values)
    else:
        indices, values = tf.numpy_function(reduce, inputs, [tf.int64, grad.values.dtype], stateful=True)
        indices = tf.ensure_shape(indices, [None])
        values = tf.ensure_shape(values, tf.TensorShape([None]).concatenate(grad.values.shape[1:]))
    return tf.IndexedSlices(values, indices, grad.dense_shape)
