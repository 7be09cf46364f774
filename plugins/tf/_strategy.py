"""ctf.Strategy: a tf.distribute.MirroredStrategy over this process' one device whose
reductions across replicas go through collectives, so that Keras' model.fit under its scope
trains data parallel over every worker, as under MultiWorkerMirroredStrategy::

    strategy = ctf.Strategy()
    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x_shard, y_shard, batch_size=per_worker_batch)

How it plugs in (checked on TensorFlow 2.21, Keras 3):
- Keras' TF optimizer sums the gradients with ReplicaContext.all_reduce(SUM), which
  MirroredStrategy hands to its CrossDeviceOps' batch_reduce: the public extension point. A
  CrossDeviceOps skips batch_reduce_implementation where there is one worker and one local
  value; the workers it counts are its `_num_between_graph_workers` property, which TF's
  source says subclasses may override but which is private: the one private name used here
  (_AllReduce), checked at construction so that a TensorFlow without it fails loudly.
- num_replicas_in_sync (public) is the number of workers: Keras divides each worker's loss by
  it, so the summed gradients are the global batch's mean gradient.
- Variables made under scope() take worker 0's initial values (a broadcast per variable, in
  creation order, as MultiWorkerMirroredStrategy does) through tf.variable_creator_scope.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import tensorflow as tf

from ._context import communicator
from ._fusion import DEFAULT_BUCKET_BYTES, check_reduction, reduce_gradients
from ._ops import broadcast

# Variables of these dtypes are broadcast at creation (the core's); others (a seed
# generator's uint32 state, strings) stay each worker's own.
_BROADCAST_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int8, tf.uint8, tf.int32, tf.int64)


class _AllReduce(tf.distribute.CrossDeviceOps):
    """Reduces each value over every worker through collectives' fused buckets (sparse
    gradients by the rule of DistributedGradientTape)."""

    def __init__(self, bucket_bytes: int):
        super().__init__()
        if not isinstance(getattr(tf.distribute.CrossDeviceOps, "_num_between_graph_workers", None), property):
            raise RuntimeError(f"ctf.Strategy relies on tf.distribute.CrossDeviceOps._num_between_graph_workers, "
                               f"which this TensorFlow ({tf.__version__}) does not have: use ctf.DistributedOptimizer "
                               "outside any strategy instead")
        self._bucket_bytes = bucket_bytes

    @property
    def _num_between_graph_workers(self):
        # More than one: CrossDeviceOps.reduce and batch_reduce call the implementations below
        # even for this process' single replica.
        return communicator().size

    def reduce_implementation(self, reduce_op, per_replica_value, destinations, options):
        return self.batch_reduce_implementation(reduce_op, [(per_replica_value, destinations)], options)[0]

    def batch_reduce_implementation(self, reduce_op, value_destination_pairs, options):
        values = []
        for value, _ in value_destination_pairs:
            local = value.values if isinstance(value, tf.distribute.DistributedValues) else (value,)
            if len(local) != 1:
                raise ValueError(f"ctf.Strategy runs one replica per worker, not {len(local)}")
            values.append(local[0])
        op = "avg" if reduce_op == tf.distribute.ReduceOp.MEAN else "sum"
        return reduce_gradients(values, op, self._bucket_bytes)


class Strategy(tf.distribute.MirroredStrategy):
    """A tf.distribute strategy of one replica per worker (this process' CPU, or ``device``)
    whose cross-replica reductions (Keras' gradient all-reduce among them) run on
    collectives' ring or reduction server. ctf.init() first; every worker builds and fits the
    same model under ``scope()``, each on its own shard (per-worker batches, as under
    MultiWorkerMirroredStrategy). bucket_bytes: as DistributedOptimizer's."""

    def __init__(self, device: str = "/cpu:0", *, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        check_reduction("sum", bucket_bytes)
        communicator()  # RuntimeError now if ctf.init() was not called
        super().__init__(devices=[device], cross_device_ops=_AllReduce(bucket_bytes))

    @property
    def num_replicas_in_sync(self) -> int:
        return communicator().size

    @contextlib.contextmanager
    def scope(self) -> Iterator["Strategy"]:
        with super().scope(), tf.variable_creator_scope(_from_worker_0):
            yield self


def _from_worker_0(next_creator, **kwargs):
    """Makes the variable with worker 0's initial value."""
    initial = kwargs.get("initial_value")
    dtype = kwargs.get("dtype")
    if initial is None or (dtype is not None and tf.as_dtype(dtype).base_dtype not in _BROADCAST_DTYPES):
        return next_creator(**kwargs)

    def broadcast_initial_value():
        value = tf.convert_to_tensor(initial() if callable(initial) else initial, dtype=dtype)
        return broadcast(value, root=0) if value.dtype in _BROADCAST_DTYPES else value

    kwargs["initial_value"] = broadcast_initial_value
    return next_creator(**kwargs)
