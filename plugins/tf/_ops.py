"""Collectives on TensorFlow tensors, eagerly and inside tf.function, through collectives.tf's
custom ops where they are in use (_native.py), else through numpy functions: eagerly the
numpy function runs at once (so a failure raises collectives.CollectiveError itself); in a
graph it runs as a tf.numpy_function, and the output's static shape is restored with
tf.ensure_shape.

Order: tf.function adds control dependencies between stateful ops in program order, and both
the custom ops and the numpy functions here are stateful, so every rank issues its
collectives in the order the program wrote them, as the core requires."""

from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import tensorflow as tf

from . import _native
from ._context import communicator


def writable_copy(array) -> np.ndarray:
    """The core reduces in place; what TF hands over may be read-only or shared."""
    return np.array(array, copy=True, order="C")


def run(func: Callable[..., np.ndarray], inputs: Sequence[tf.Tensor], dtype: tf.DType,
        shape: tf.TensorShape) -> tf.Tensor:
    """``func(*arrays)`` on the inputs' values: one output of ``dtype`` and ``shape``."""
    if tf.executing_eagerly():
        return tf.convert_to_tensor(func(*(t.numpy() for t in inputs)), dtype=dtype)
    out = tf.numpy_function(func, list(inputs), dtype, stateful=True)
    return tf.ensure_shape(out, shape)


def allreduce(tensor, op: str = "sum") -> tf.Tensor:
    """``tensor`` reduced over every worker (op: sum, avg, min, max, prod; avg for floating
    dtypes only), on the ring or the reducers. A new tensor of the same shape and dtype."""
    tensor = _dense(tensor, "allreduce")
    comm = communicator()
    if _native.ops():
        return _native.run(comm, tensor, "allreduce", op=op)
    return run(lambda x: comm.allreduce(writable_copy(x), op=op), [tensor], tensor.dtype, tensor.shape)


def allgather(tensor) -> tf.Tensor:
    """Every worker's ``tensor`` (same shape on all), stacked in rank order: shape
    ``(size, *tensor.shape)``, as collectives' Communicator.allgather."""
    tensor = _dense(tensor, "allgather")
    comm = communicator()
    if _native.ops():
        return _native.run(comm, tensor, "allgather")
    return run(lambda x: comm.allgather(writable_copy(x)), [tensor], tensor.dtype,
               tf.TensorShape([comm.size]).concatenate(tensor.shape))


def broadcast(tensor, root: int = 0) -> tf.Tensor:
    """Worker ``root``'s ``tensor`` on every worker (a new tensor)."""
    tensor = _dense(tensor, "broadcast")
    comm = communicator()
    if _native.ops():
        return _native.run(comm, tensor, "broadcast", root=root)
    return run(lambda x: comm.broadcast(writable_copy(x), root=root), [tensor], tensor.dtype, tensor.shape)


def broadcast_variables(variables: Sequence[tf.Variable], root: int = 0):
    """Assigns worker ``root``'s values to ``variables`` on every worker (every worker passes
    the same variables in the same order): one broadcast per dtype, of the variables'
    concatenated values. Inside tf.function the assignments run as part of the function."""
    variables = list(variables)
    comm = communicator()
    dtypes = [tf.as_dtype(v.dtype) for v in variables]  # Keras 3 variables name theirs by a string
    for dtype in sorted(set(dtypes), key=lambda d: d.name):
        group = [v for v, d in zip(variables, dtypes) if d == dtype]
        values = [tf.convert_to_tensor(v) for v in group]
        if _native.ops():
            flat = _native.run(comm, tf.concat([tf.reshape(v, [-1]) for v in values], 0), "broadcast", root=root)
        else:
            flat = run(lambda *xs: comm.broadcast(concatenate(xs), root=root), values, dtype,
                       tf.TensorShape([sum(v.shape.num_elements() for v in group)]))
        for variable, value in zip(group, split_like(flat, values)):
            variable.assign(value)


def concatenate(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One new flat buffer of the arrays' values, in order (the core's in-place buffer)."""
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])


def split_like(flat: tf.Tensor, tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """The inverse of concatenate: ``flat`` cut into the tensors' shapes."""
    static = all(t.shape.is_fully_defined() for t in tensors)  # keeps the static shapes in a graph
    sizes = [t.shape.num_elements() if static else tf.size(t) for t in tensors]
    return [tf.reshape(part, t.shape if static else tf.shape(t)) for part, t in zip(tf.split(flat, sizes), tensors)]


def _dense(tensor, what: str) -> tf.Tensor:
    if isinstance(tensor, tf.IndexedSlices):
        raise TypeError(f"{what} takes dense tensors: tf.convert_to_tensor() an IndexedSlices first, or let "
                        "DistributedGradientTape/DistributedOptimizer reduce sparse gradients")
    return tf.convert_to_tensor(tensor)
