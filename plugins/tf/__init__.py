"""collectives for TensorFlow 2 and Keras 3: Horovod's API over collectives' ring and
reduction server, through custom ops compiled against the installed TensorFlow at first use,
or tf.numpy_function where they cannot be (COLLECTIVES_TF_OPS; ops_in_use() says which)::

    import collectives.tf as ctf
    ctf.init()                                        # mpirun, torchrun, COLLECTIVES_*: as collectives.init()
    model.compile(optimizer=ctf.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    model.fit(x_shard, y_shard, callbacks=[ctf.callbacks.BroadcastGlobalVariablesCallback(0),
                                           ctf.callbacks.MetricAverageCallback()])

    tape = ctf.DistributedGradientTape(tape)          # custom loops, eager or in tf.function
    ctf.allreduce(t, op="sum"); ctf.allgather(t); ctf.broadcast(t, root=0)
    ctf.broadcast_variables(model.variables, root=0)

    with ctf.Strategy().scope():                      # tf.distribute's way: reductions through collectives
        model = make_model(); model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x_shard, y_shard)

Every worker calls the same collectives in the same order. A failure on any worker raises
collectives.CollectiveError eagerly; inside tf.function TensorFlow reports it as
tf.errors.UnknownError carrying the CollectiveError's message.
"""

from . import callbacks
from ._context import communicator, init, rank, shutdown, size
from ._fusion import DEFAULT_BUCKET_BYTES
from ._native import ops_in_use
from ._ops import allgather, allreduce, broadcast, broadcast_variables
from ._optimizer import DistributedOptimizer
from ._strategy import Strategy
from ._tape import DistributedGradientTape

__all__ = ["init", "shutdown", "communicator", "rank", "size", "allreduce", "allgather", "broadcast",
           "broadcast_variables", "ops_in_use", "DistributedGradientTape", "DistributedOptimizer", "Strategy", "DEFAULT_BUCKET_BYTES",
           "callbacks"]
