"""DistributedOptimizer: a Keras 3 optimizer whose apply() first reduces the gradients over
the workers, so that model.fit (and any loop calling apply or apply_gradients) trains data
parallel."""

from __future__ import annotations

import keras

from ._fusion import DEFAULT_BUCKET_BYTES, check_reduction, reduce_gradients


def DistributedOptimizer(optimizer: keras.optimizers.Optimizer, *, op: str = "avg",  # noqa: N802 (Horovod's name)
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> keras.optimizers.Optimizer:
    """A new optimizer of ``optimizer``'s class and configuration whose ``apply()`` (which
    ``apply_gradients`` and Keras' train_step call) averages the gradients over every worker
    first, in fused buckets::

        model.compile(optimizer=ctf.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss=...)

    Wrap an optimizer that has not been built yet (before compile or its first step): its
    variables are made anew. op and bucket_bytes: as DistributedGradientTape's.
    """
    check_reduction(op, bucket_bytes)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a keras.optimizers.Optimizer, not {type(optimizer).__name__}")
    if optimizer.built:
        raise ValueError("this optimizer has been built (it has variables): wrap it with DistributedOptimizer "
                         "before model.compile() or its first step")
    base = type(optimizer)

    class Distributed(base):
        def apply(self, grads, trainable_variables=None):
            return super().apply(reduce_gradients(list(grads), op, bucket_bytes), trainable_variables)

    # Saved as the optimizer it wraps (model.save, keras.saving): a saved model loads anywhere,
    # with the plain optimizer; wrap that one's class and config anew to train on.
    Distributed.__name__, Distributed.__qualname__ = base.__name__, base.__qualname__
    Distributed.__module__ = base.__module__
    return Distributed.from_config(optimizer.get_config())
