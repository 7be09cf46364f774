"""Keras callbacks for data-parallel training with collectives.tf (as Horovod's)::

    model.fit(..., callbacks=[ctf.callbacks.BroadcastGlobalVariablesCallback(0),
                              ctf.callbacks.MetricAverageCallback(), ...])
"""

from __future__ import annotations

import keras
import numpy as np

from ._context import communicator
from ._ops import broadcast_variables

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback"]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """At the start of the first fit(), gives every worker worker ``root``'s model and
    optimizer variables, so that all start from the same weights (however each initialized
    them)."""

    def __init__(self, root: int = 0):
        super().__init__()
        self.root = root
        self._done = False

    def on_train_begin(self, logs=None):
        if self._done:
            return
        variables = list(self.model.variables)
        optimizer = self.model.optimizer
        if optimizer is not None:
            if not optimizer.built:  # its variables are made at its first step otherwise
                optimizer.build(self.model.trainable_variables)
            variables += list(optimizer.variables)
        broadcast_variables(variables, self.root)
        self._done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """At the end of each epoch, replaces the epoch's metrics (loss, compiled metrics and
    their val_ forms) by their average over the workers, so that every worker logs, checkpoints
    and stops early on the same figures. Put it before the callbacks that read them."""

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        names = sorted(logs)
        averaged = communicator().allreduce(np.array([float(logs[n]) for n in names], np.float64), op="avg")
        logs.update(zip(names, averaged.tolist()))
