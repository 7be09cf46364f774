"""train.py's worker for TensorFlow (--framework tf): the same MLP in Keras 3, each step one
tf.function, trained by TensorFlow's own MultiWorkerMirroredStrategy (its RING collective over
gRPC, TF_CONFIG naming every worker host) and by collectives.tf's DistributedGradientTape on
the collectives ring and on the reduction server, the systems taking turns step by step in the
same processes (see train.py's docstring).

The strategy must exist before TensorFlow runs anything, and its options (the pack size of its
all-reduces) are fixed with it: one bucket size per process. collectives.tf reads its one
communicator when a step is traced (collectives.tf.init(comm) before each step of a system
hands it that system's). COLLECTIVES_TF_OPS (set by the driver per run) picks collectives.tf's
op path where the installed collectives.tf offers more than one."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import _checks
from _train_worker import CLASSES, LEARNING_RATE, timed_rounds, write_report

OPS_ENV = "COLLECTIVES_TF_OPS"
PATH_LINE = "collectives.tf: collectives run in"  # how collectives.tf's log line on the path in use starts
GRPC_PORT = 29700  # on each worker host: MultiWorkerMirroredStrategy's gRPC server (TF_CONFIG)


def tf_config(addresses, index):
    """TF_CONFIG of worker `index` among the worker hosts at `addresses` (one per host)."""
    return json.dumps({"cluster": {"worker": [f"{address}:{GRPC_PORT}" for address in addresses]},
                       "task": {"type": "worker", "index": index}})


# One process, one all-reduce inside a tf.function, under a COLLECTIVES_TF_OPS value.
_PROBE = """
import tensorflow as tf
import collectives.tf as ctf
ctf.init()
assert float(tf.function(lambda: ctf.allreduce(tf.ones([2])))()[0]) == 1.0
"""
PROBE_TIMEOUT_S = 300  # the custom op may be compiled at its first use


def offered_ops(paths, env):
    """(the op paths of `paths` the installed collectives.tf runs, a note per one left out).
    Each is tried in a process of its own (env: the job's, less its launch variables): an
    allreduce in a tf.function under COLLECTIVES_TF_OPS=PATH. A collectives.tf that takes an
    unknown value too does not read the variable: it has the numpy_function path only."""
    def runs(value):
        done = subprocess.run([sys.executable, "-c", _PROBE], env={**env, OPS_ENV: value}, cwd=tempfile.gettempdir(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        return done.returncode == 0, (done.stderr.strip().splitlines() or ["(no output)"])[-1]

    if paths == ["numpy"]:  # whichever collectives.tf is installed, it has this one
        return paths, []
    if runs("no-such-path")[0]:
        reasons = {path: "the installed collectives.tf does not read COLLECTIVES_TF_OPS: it has the "
                   "numpy_function path only" for path in paths if path != "numpy"}
    else:
        reasons = {}
        for path in paths:
            ok, last = runs(path)
            if not ok:
                reasons[path] = f"COLLECTIVES_TF_OPS={path} failed in a one-process probe: {last}"
    return ([path for path in paths if path not in reasons],
            [f"collectives.tf's {path} path not measured: {why}" for path, why in reasons.items()])


class _PathLine(logging.Handler):
    """Keeps collectives.tf's log line saying which op path is in use (logger "collectives",
    INFO, at its first collective)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.line = None

    def emit(self, record):
        message = record.getMessage()
        if self.line is None and message.startswith(PATH_LINE):
            self.line = message


def _gather(comm, record):
    """Every rank's record (JSON-able), in rank order, over the collectives communicator."""
    data = np.frombuffer(json.dumps(record).encode(), np.uint8)
    longest = int(comm.allreduce(np.array([len(data)], np.int64), op="max")[0])
    padded = np.zeros(longest, np.uint8)
    padded[:len(data)] = data
    return [json.loads(bytes(row).rstrip(b"\0")) for row in comm.allgather(padded)]


def worker(args):
    """One worker of the job (RANK, WORLD_SIZE, TF_CONFIG, COLLECTIVES_RENDEZVOUS in the
    environment); worker 0 writes the job's raw figures to --worker-report."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.placement:
        _checks.report_placement(args.placement, rank, args.link)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one compute thread per worker, as torch's
    systems = args.systems
    (cap,) = args.bucket_caps
    bucket_bytes = int(cap * 2**20)
    strategy = None
    if "mwms" in systems:  # before anything else runs in TensorFlow
        ring = tf.distribute.experimental.CommunicationImplementation.RING
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                bytes_per_pack=bucket_bytes, implementation=ring))
    import keras

    path_line = _PathLine()
    logger = logging.getLogger("collectives")
    logger.addHandler(path_line)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    import collectives
    import collectives.tf as ctf

    world = collectives.init(timeout=args.timeout)
    # As train_torch's groups: the communicator spanning the job gets the reducers; the ring
    # row runs a group of it forced to the ring.
    groups = {}
    if "reduction_server" in systems:
        groups["reduction_server"] = world
    if "ring" in systems:
        groups["ring"] = world.create_group(list(range(size)), algorithm="ring")
    algorithms = {"none": "none", "mwms": "mwms"}
    for name, comm in groups.items():
        algorithms[name] = comm.algorithm
        if _checks.algorithm_name(comm.algorithm) != name:
            raise RuntimeError(f"the collectives communicator meant for {name} runs {comm.algorithm}")

    def build_model():
        keras.utils.set_random_seed(0)  # every system and every rank: the same initial weights
        return keras.Sequential([keras.Input((args.width,)),
                                 *[keras.layers.Dense(args.width, activation="relu") for _ in range(args.layers)],
                                 keras.layers.Dense(CLASSES)])

    generator = np.random.default_rng(1000 + rank)  # each worker its own fixed batch
    inputs = tf.constant(generator.standard_normal((args.batch, args.width), np.float32))
    targets = tf.constant(generator.integers(0, CLASSES, args.batch))
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def plain_step(model, optimizer, reduce):
        """One step of the model: the mean loss's gradients, reduce(tape) of them, SGD."""
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(per_example(y, model(x, training=True)))
            grads = reduce(tape).gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss
        return step

    def mwms_step(model, optimizer):
        """The strategy's step: each worker's loss scaled by the global batch, the replicas'
        gradients summed by Keras' optimizer through the strategy (its all-reduce)."""
        @tf.function
        def step(x, y):
            def replica(x, y):
                with tf.GradientTape() as tape:
                    loss = tf.nn.compute_average_loss(per_example(y, model(x, training=True)),
                                                      global_batch_size=args.batch * size)
                optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
                return loss
            return strategy.run(replica, args=(x, y))
        return step

    models, steps = {}, {}
    for name in systems:
        if name == "mwms":
            with strategy.scope():
                models[name] = build_model()
                steps[name] = mwms_step(models[name], keras.optimizers.SGD(LEARNING_RATE))
            continue
        models[name] = build_model()
        reduce = ((lambda tape: tape) if name == "none"
                  else (lambda tape: ctf.DistributedGradientTape(tape, bucket_bytes=bucket_bytes)))
        steps[name] = plain_step(models[name], keras.optimizers.SGD(LEARNING_RATE), reduce)

    def train_step(name):
        if name in groups:  # collectives.tf's communicator for this system's step (read when it traces)
            ctf.shutdown()
            ctf.init(groups[name])
        start = time.perf_counter()
        steps[name](inputs, targets)  # returns once the step has run (eager mode is synchronous)
        return {"step_s": time.perf_counter() - start}

    record, cpu = timed_rounds(args, systems, train_step, world.barrier, rank,
                               f"bucket {cap:g} MB, COLLECTIVES_TF_OPS={os.environ.get(OPS_ENV, '(unset)')}")

    def weights(name):
        return [np.asarray(v.numpy()) for v in models[name].trainable_variables]

    baseline = weights("mwms") if "mwms" in systems else None
    for name in systems[1:]:
        digest = hashlib.sha256()
        for value in weights(name):
            digest.update(np.ascontiguousarray(value).tobytes())
        record[name]["hash"] = digest.hexdigest()
        if baseline is not None:
            record[name]["max_abs_diff_vs_mwms"] = max(
                float(np.abs(a - b).max()) for a, b in zip(weights(name), baseline))
    everyone = _gather(world, record)
    if rank == 0:
        write_report(args, size, systems, algorithms,
                     [{"bucket_cap_mb": cap, "buckets": {}, "ranks": everyone, "cpu": cpu}],
                     framework="tf", baseline="mwms", tf_ops=os.environ.get(OPS_ENV),
                     tf_ops_line=path_line.line, tensorflow=tf.__version__, keras=keras.__version__)
    ctf.shutdown()
    world.close()
