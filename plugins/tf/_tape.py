"""DistributedGradientTape: a tf.GradientTape whose gradients are averaged over the workers."""

from __future__ import annotations

import tensorflow as tf

from ._fusion import DEFAULT_BUCKET_BYTES, check_reduction, reduce_gradients


class DistributedGradientTape:
    """Wraps a tf.GradientTape (used as usual, then handed over) so that ``gradient()``
    returns the gradients reduced over every worker, in fused buckets (see
    collectives.tf's README section for the rule for IndexedSlices)::

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        tape = ctf.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)

    op: "avg" (the default: each worker's loss is a mean over its own shard) or "sum".
    bucket_bytes: the most bytes fused into one all-reduce.
    Every other attribute is the tape's.
    """

    def __init__(self, tape: tf.GradientTape, *, op: str = "avg", bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        check_reduction(op, bucket_bytes)
        self._tape, self._op, self._bucket_bytes = tape, op, bucket_bytes

    def gradient(self, target, sources, output_gradients=None,
                 unconnected_gradients=tf.UnconnectedGradients.NONE):
        grads = self._tape.gradient(target, sources, output_gradients, unconnected_gradients)
        flat = tf.nest.flatten(grads)
        return tf.nest.pack_sequence_as(grads, reduce_gradients(flat, self._op, self._bucket_bytes))

    def __getattr__(self, name):
        return getattr(self._tape, name)
