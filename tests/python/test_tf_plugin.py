"""collectives.tf: TensorFlow 2 / Keras 3 over collectives, with real TensorFlow processes.

Keras model.fit on 3 workers (DistributedOptimizer, BroadcastGlobalVariablesCallback,
MetricAverageCallback; and under ctf.Strategy's scope with a plain optimizer), each on its
shard of every global batch, ends where single-process
training on the global batches ends, on the ring and on a reducer; the same model without
averaging (the negative control) does not. So do custom loops with DistributedGradientTape,
eagerly and in tf.function. The tensor collectives, eagerly and in graphs (static shapes
kept), the sparse-gradient rule's two branches, and a rank that raises mid-training making
the others raise; examples/tf_keras.py. The key cases run on both paths of the collectives
(COLLECTIVES_TF_OPS): the custom ops, built once per test session into a fresh cache by the
first job's 3 ranks at once, and the numpy functions; without a compiler the first falls back
to the second, saying so. scripts/test runs these in their own venv (.venv-tf, with
tensorflow-cpu): `pytest -m tf`.
"""

import os
import re
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

import collectives.tf as ctf  # noqa: E402

FULL = os.environ.get("COLLECTIVES_TEST_FULL") == "1"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tf_keras.py"
pytestmark = [pytest.mark.tf, pytest.mark.timeout(300)]

# Quiet TensorFlow's start-up lines; oneDNN off: its kernels may round differently for
# different batch sizes, and the checks compare a batch of 12 with three of 4.
TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "COLLECTIVES_TIMEOUT": "30"}
# The two paths; the numpy one's heavier runs with COLLECTIVES_TEST_FULL=1 only.
OPS_PATHS = ["custom", "numpy"]
OPS_PATHS_IN_FULL = ["custom", pytest.param("numpy", marks=pytest.mark.skipif(
    not FULL, reason="the numpy_function path's run (the custom ops' in CI): runs with COLLECTIVES_TEST_FULL=1"))]


@pytest.fixture(scope="module")
def op_cache(tmp_path_factory):
    """A cache of the custom ops of this session's own: the first job builds them."""
    return tmp_path_factory.mktemp("tf-ops-cache")


def tf_env(op_cache, ops: str) -> dict:
    return {**TF_ENV, "COLLECTIVES_CACHE": str(op_cache), "COLLECTIVES_TF_OPS": ops}

# A model with an embedding (sparse gradients) and dense layers, trained on 3 workers by
# model.fit and by custom loops, and on one process over the global batches: each run's
# weights' distance from that reference. Every rank initializes its own weights (seed
# 100 + rank); the reference starts from rank 0's, which the broadcast gives everyone.
# TensorFlow is imported before collectives on purpose (see collectives/_core_loading.py).
TRAIN_SCRIPT = r'''
import hashlib, json, sys
import numpy as np
import tensorflow as tf
import keras
import collectives.tf as ctf

comm = ctf.init()
rank, size = ctf.rank(), ctf.size()
PER_WORKER, STEPS, EPOCHS, VOCAB = 4, 4, 2, 50
GLOBAL = PER_WORKER * size
data = np.random.default_rng(7)
ids = data.integers(0, VOCAB, (GLOBAL * STEPS, 3))
y = data.standard_normal((GLOBAL * STEPS, 2)).astype(np.float32)
# Worker k's shard: rows k*PER_WORKER.. of every global batch.
mine = np.concatenate([np.arange(s * GLOBAL + rank * PER_WORKER, s * GLOBAL + (rank + 1) * PER_WORKER)
                       for s in range(STEPS)])

def model(seed):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(VOCAB, 8),
                          keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(16, activation="tanh"),
                          keras.layers.Dense(2)])
    return m

def weights(m):
    return np.concatenate([w.reshape(-1) for w in m.get_weights()])

def sha(m):
    return hashlib.sha256(weights(m).tobytes()).hexdigest()

reference = model(100)
reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
reference.fit(ids, y, batch_size=GLOBAL, epochs=EPOCHS, shuffle=False, verbose=0)
expected = weights(reference)
runs = {}

def record(name, m, **extra):
    got = weights(m)
    runs[name] = {"max_diff": float(np.abs(got - expected).max()), "sha": sha(m),
                  "close": bool(np.allclose(got, expected, rtol=1e-5, atol=1e-6)), **extra}

def fit(name, optimizer):
    m = model(100 + rank)
    m.compile(optimizer=optimizer, loss="mse")
    history = m.fit(ids[mine], y[mine], batch_size=PER_WORKER, epochs=EPOCHS, shuffle=False, verbose=0,
                    callbacks=[ctf.callbacks.MetricAverageCallback(),
                               ctf.callbacks.BroadcastGlobalVariablesCallback(0)])
    record(name, m, loss=history.history["loss"])

fit("fit", ctf.DistributedOptimizer(keras.optimizers.SGD(0.1), bucket_bytes=512))  # several buckets
fit("fit_not_averaged", keras.optimizers.SGD(0.1))  # the negative control

def custom_loop(name, compiled):
    m = model(100 + rank)
    before = sha(m)
    ctf.broadcast_variables(m.variables, root=0)
    optimizer = keras.optimizers.SGD(0.1)

    def step(x, t):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(m(x) - t))
        tape = ctf.DistributedGradientTape(tape, bucket_bytes=512)
        grads = tape.gradient(loss, m.trainable_variables)
        optimizer.apply(grads, m.trainable_variables)
        return grads

    step = tf.function(step) if compiled else step
    for epoch in range(EPOCHS):
        for s in range(STEPS):
            rows = mine[s * PER_WORKER:(s + 1) * PER_WORKER]
            grads = step(tf.constant(ids[rows]), tf.constant(y[rows]))
    record(name, m, initial_sha=before, sparse=isinstance(grads[0], tf.IndexedSlices))

def strategy_fit(name):
    strategy = ctf.Strategy(bucket_bytes=512)
    with strategy.scope():  # no broadcast callback: the strategy gives every worker rank 0's initial weights
        m = model(100 + rank)
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = m.fit(ids[mine], y[mine], batch_size=PER_WORKER, epochs=EPOCHS, shuffle=False, verbose=0)
    record(name, m, replicas=strategy.num_replicas_in_sync, loss=history.history["loss"])

strategy_fit("strategy_fit")
custom_loop("tape_eager", compiled=False)
custom_loop("tape_function", compiled=True)
print(json.dumps({"runs": runs, "algorithm": comm.algorithm, "ops": ctf.ops_in_use(),
                  "reducer_bytes": sum(r["bytes_received"] for r in comm.reducer_stats())}))
ctf.shutdown()
'''


@pytest.mark.parametrize("ops", OPS_PATHS_IN_FULL)
@pytest.mark.parametrize("reducers", [pytest.param(0, marks=pytest.mark.skipif(
    not FULL, reason="the ring's run (the reducer's runs in CI): runs with COLLECTIVES_TEST_FULL=1")), 1])
def test_training_on_3_workers_ends_where_one_process_on_the_global_batch_ends(run_ranks, op_cache, reducers, ops):
    results = run_ranks(TRAIN_SCRIPT, 3, env=tf_env(op_cache, ops), reducers=reducers, timeout=240)
    reports = [r.report() for r in results[:3]]
    assert {report["ops"] for report in reports} == {ops}
    served = {(report["algorithm"], report["reducer_bytes"] > 0) for report in reports}
    assert served == {("reduction_server", True) if reducers else ("auto", False)}, served
    for name, runs in ((name, [report["runs"][name] for report in reports]) for name in reports[0]["runs"]):
        if name == "fit_not_averaged":  # each worker trained on its shard alone: the check must catch it
            assert not any(run["close"] for run in runs), runs
            continue
        assert len({run["sha"] for run in runs}) == 1, f"{name}: the workers' weights differ"
        assert all(run["close"] for run in runs), (name, runs)
    fit_runs = [report["runs"]["fit"] for report in reports]
    assert all(run["loss"] == fit_runs[0]["loss"] for run in fit_runs), "MetricAverageCallback: losses differ"
    assert all(report["runs"]["strategy_fit"]["replicas"] == 3 for report in reports)
    for report in reports:
        tape_runs = [report["runs"][name] for name in ("tape_eager", "tape_function")]
        assert all(run["sparse"] for run in tape_runs), "the embedding's gradient was not an IndexedSlices"
    # Each rank started from its own weights: the broadcast made them rank 0's.
    assert len({report["runs"]["tape_eager"]["initial_sha"] for report in reports}) == 3
    for result in results[3:]:
        assert result.returncode == 0, result.stderr


# allreduce/allgather/broadcast/broadcast_variables eagerly and in tf.function against numpy;
# the static shapes a graph keeps; the two branches of the sparse rule. Prints the failures.
# collectives is imported before TensorFlow here (the other order is TRAIN_SCRIPT's).
OPS_SCRIPT = r'''
import json
import collectives.tf as ctf
import numpy as np
import tensorflow as tf

ctf.init()
rank, size = ctf.rank(), ctf.size()
failures, checked = [], 0

def check(name, got, expected, close=False):
    global checked
    checked += 1
    same = np.allclose if close else np.array_equal
    if not same(np.asarray(got), np.asarray(expected)):
        failures.append(f"{name}: {np.asarray(got).tolist()} != {np.asarray(expected).tolist()}")

def value(r, dtype):
    return (np.arange(6).reshape(2, 3) * (r + 1) - 2).astype(dtype)

everyone = lambda dtype: np.stack([value(r, dtype) for r in range(size)])
for dtype in (np.float32, np.float64, np.int32, np.int64, np.float16):
    for op, reduce in (("sum", np.sum), ("min", np.min), ("max", np.max)):
        check(f"allreduce {op} {dtype.__name__} eager", ctf.allreduce(tf.constant(value(rank, dtype)), op=op),
              reduce(everyone(dtype), axis=0))
check("allreduce avg", ctf.allreduce(tf.constant(value(rank, np.float64)), op="avg"), everyone(np.float64).mean(0))
check("allgather eager", ctf.allgather(tf.constant(value(rank, np.int32))), everyone(np.int32))
check("broadcast eager", ctf.broadcast(tf.constant(value(rank, np.float32)), root=1), value(1, np.float32))

@tf.function
def collectives(x):
    return ctf.allreduce(x), ctf.allgather(x), ctf.broadcast(x, root=2), ctf.allreduce(x, op="max")

x = tf.constant(value(rank, np.float32))
outputs = collectives(x)
shapes = [o.shape.as_list() for o in collectives.get_concrete_function(x).outputs]
check("static shapes in tf.function", np.array(shapes, dtype=object),
      np.array([[2, 3], [size, 2, 3], [2, 3], [2, 3]], dtype=object))
for name, got, expected in zip(("allreduce", "allgather", "broadcast", "allreduce max"), outputs,
                               (everyone(np.float32).sum(0), everyone(np.float32), value(2, np.float32),
                                everyone(np.float32).max(0))):
    check(f"{name} in tf.function", got, expected)

variables = [tf.Variable(value(rank, np.float32)), tf.Variable(np.full(4, rank, np.int64)), tf.Variable(float(rank))]
ctf.broadcast_variables(variables, root=1)
check("broadcast_variables", np.concatenate([v.numpy().reshape(-1).astype(np.float64) for v in variables]),
      np.concatenate([value(1, np.float64).reshape(-1), np.full(4, 1.0), [1.0]]))
variables = [tf.Variable(value(rank, np.float32))]
tf.function(lambda: ctf.broadcast_variables(variables, root=2))()
check("broadcast_variables in tf.function", variables[0], value(2, np.float32))

# The sparse rule: 2 rows per worker, so gathering sends 2 * size rows: fewer than 50 (all-gathered), not
# fewer than 4 (densified). Worker r looks up rows r and 3 with weight r + 1.
for rows, branch in ((50, "gathered"), (4, "densified")):
    table, w = tf.Variable(tf.ones([rows, 2])), tf.Variable(tf.ones([2, 1]))
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(tf.gather(table, [rank, 3]), w)) * (rank + 1)
        return ctf.DistributedGradientTape(tape).gradient(loss, [table, w])
    expected = np.zeros((rows, 2))
    for r in range(size):
        expected[[r, 3]] += (r + 1) / size
    for mode, run in (("eager", gradients), ("tf.function", tf.function(gradients))):
        sparse, dense = run()
        check(f"sparse {branch} {mode}: kind", type(sparse).__name__, "IndexedSlices")
        check(f"sparse {branch} {mode}: rows sent", len(sparse.indices), 2 * size if branch == "gathered" else rows)
        check(f"sparse {branch} {mode}", tf.convert_to_tensor(sparse), expected, close=True)
        check(f"dense beside sparse {branch} {mode}", dense,
              np.full((2, 1), 2 * sum(r + 1 for r in range(size)) / size), close=True)
print(json.dumps({"failures": failures, "checked": checked, "ops": ctf.ops_in_use()}))
ctf.shutdown()
'''


@pytest.mark.parametrize("ops", OPS_PATHS)
def test_tensor_collectives_eagerly_and_in_tf_function(run_ranks, op_cache, ops):
    results = run_ranks(OPS_SCRIPT, 3, env=tf_env(op_cache, ops), timeout=180)
    for result in results:
        report = result.report()
        assert report["failures"] == [] and report["checked"] > 40 and report["ops"] == ops, report


# Rank 1 raises after its second step; the others are in (or start) the next all-reduce.
FAILING_RANK_SCRIPT = r'''
import json, sys
import numpy as np
import tensorflow as tf
import keras
import collectives as cc
import collectives.tf as ctf

ctf.init()
rank = ctf.rank()

class FailOnRank1(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.step = batch
        if rank == 1 and batch == 1:
            raise RuntimeError("rank 1 fails on purpose")

keras.utils.set_random_seed(0)
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
m.compile(optimizer=ctf.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse",
          run_eagerly=sys.argv[1] == "eager")
counter = FailOnRank1()
try:
    m.fit(np.ones((400, 4), np.float32), np.ones((400, 1), np.float32), batch_size=4, verbose=0, callbacks=[counter])
    print(json.dumps({"step": counter.step}))
except Exception as e:
    print(json.dumps({"step": counter.step, "error": str(e)[-2000:], "type": type(e).__name__,
                      "collective_error": isinstance(e, cc.CollectiveError)}))
    sys.exit(1)
'''


@pytest.mark.parametrize("ops", OPS_PATHS_IN_FULL)
@pytest.mark.parametrize("mode", ["graph", pytest.param("eager", marks=pytest.mark.skipif(
    not FULL, reason="model.fit(run_eagerly=True) failing: runs with COLLECTIVES_TEST_FULL=1"))])
def test_a_rank_that_raises_mid_training_makes_the_others_raise(run_ranks, op_cache, mode, ops):
    results = run_ranks(FAILING_RANK_SCRIPT, 3, env=tf_env(op_cache, ops), args=[mode], timeout=150)
    for result in results:
        report = result.report()
        assert result.returncode == 1 and "error" in report, report
        assert report["step"] <= 3, report  # no rank trained on alone
    for result in (results[0], results[2]):
        report = result.report()
        assert "rank 1" in report["error"], report
        if mode == "eager":  # eagerly the CollectiveError itself
            assert report["collective_error"], report
        else:  # TensorFlow reports an error raised inside a graph as its own, with the message
            assert report["type"] == "UnknownError", report
            assert re.search(r"collectives\.errors\.(CollectiveError|TimeoutError)", report["error"]), report


# A step that fails between its collectives' start and wait: eagerly (the sparse gradient's
# all-gather refuses complex64 after the dense bucket started) and in a tf.function (an op that
# needs the start's handle fails, and the wait depends on it). Neither leaves its collective in
# the custom ops' registry; the communicator goes on.
FAILED_STEP_SCRIPT = r'''
import json
import tensorflow as tf
import collectives.tf as ctf
from collectives.tf import _fusion, _native

ctf.init()
comm = ctf.communicator()
report = {"ops": ctf.ops_in_use()}
sparse = tf.IndexedSlices(tf.ones([1, 2], tf.complex64), tf.constant([0]), tf.constant([3, 2]))
try:
    _fusion.reduce_gradients([tf.ones([4]), sparse])
except TypeError as e:
    report["eager_error"] = str(e)
report["after_eager"] = _native.in_flight()

@tf.function
def step(x):
    handle = _native.start(comm, x, "allreduce")
    failing = tf.debugging.assert_less(handle, tf.constant(-1, tf.int64), message="fails on purpose")
    with tf.control_dependencies([failing]):
        return _native.wait(handle, x.dtype)

for _ in range(2):
    try:
        step(tf.ones([8]))
    except tf.errors.InvalidArgumentError as e:
        report["graph_error"] = "fails on purpose" in str(e)
report["after_graph"] = _native.in_flight()
report["total"] = ctf.allreduce(tf.ones([3])).numpy().tolist()
print(json.dumps(report))
'''


def test_a_failed_step_leaves_no_collective_in_the_ops_registry(run_ranks, op_cache):
    for result in run_ranks(FAILED_STEP_SCRIPT, 2, env=tf_env(op_cache, "custom"), timeout=150):
        report = result.report()
        assert report["ops"] == "custom" and "complex64" in report["eager_error"] and report["graph_error"], report
        assert report["after_eager"] == 0 and report["after_graph"] == 0, report
        assert report["total"] == [2.0, 2.0, 2.0], report


# One process, with a "compiler" that always fails: auto falls back to the numpy functions and
# says why in one log line; custom refuses to go on.
FALLBACK_SCRIPT = r'''
import json, logging
import tensorflow as tf
import collectives.tf as ctf

lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("collectives").addHandler(handler)
logging.getLogger("collectives").setLevel(logging.INFO)
ctf.init()
try:
    total = ctf.allreduce(tf.constant([1.0, 2.0])).numpy().tolist()
    print(json.dumps({"ops": ctf.ops_in_use(), "total": total, "log": [l for l in lines if "collectives.tf" in l]}))
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
'''


def test_without_a_compiler_auto_falls_back_to_numpy_functions_and_custom_refuses(run_ranks, tmp_path):
    env = {**TF_ENV, "COLLECTIVES_CACHE": str(tmp_path), "CXX": "false"}
    auto, = run_ranks(FALLBACK_SCRIPT, 1, launcher=None, env={**env, "COLLECTIVES_TF_OPS": "auto"}, timeout=120)
    report = auto.report()
    assert report["ops"] == "numpy" and report["total"] == [1.0, 2.0], report
    assert len(report["log"]) == 1 and "tf.numpy_function" in report["log"][0], report
    assert re.search(r"false failed \(exit 1\): its output is in \S+build.log", report["log"][0]), report
    custom, = run_ranks(FALLBACK_SCRIPT, 1, launcher=None, env={**env, "COLLECTIVES_TF_OPS": "custom"}, timeout=120)
    assert re.match(r"OpBuildError: false failed", custom.report()["error"]), custom.report()


def test_the_ops_cache_is_keyed_by_the_compilers_version(tmp_path, monkeypatch):
    """A compiler upgraded in place (same CXX, another --version) builds the ops anew."""
    from collectives.tf import _native

    compiler = tmp_path / "c++"
    monkeypatch.setenv("COLLECTIVES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    paths = []
    for version in ("12.2.0", "12.2.0", "13.1.0"):
        compiler.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "g++ (Debian {version}) {version}" || exec g++ "$@"\n')
        compiler.chmod(0o755)
        paths.append(_native.cache_path())
    assert paths[0] == paths[1] != paths[2], paths
    monkeypatch.delenv("CXX")
    assert _native.cache_path() not in paths  # g++ itself


def test_bad_arguments_are_refused_before_anything_is_sent():
    import keras

    with pytest.raises(RuntimeError, match="init"):
        ctf.rank()
    with pytest.raises(RuntimeError, match="init"):
        ctf.Strategy()
    with pytest.raises(ValueError, match="'avg' or 'sum'"):
        ctf.DistributedOptimizer(keras.optimizers.SGD(0.1), op="max")
    with pytest.raises(ValueError, match="bucket_bytes"):
        ctf.DistributedGradientTape(tf.GradientTape(), bucket_bytes=0)
    with pytest.raises(TypeError, match="keras.optimizers.Optimizer"):
        ctf.DistributedOptimizer(object())
    built = keras.optimizers.SGD(0.1)
    built.build([keras.Variable(1.0)])
    with pytest.raises(ValueError, match="before model.compile"):
        ctf.DistributedOptimizer(built)
    with pytest.raises(TypeError, match="dense tensors"):
        ctf.allreduce(tf.IndexedSlices(tf.ones([1, 2]), tf.constant([0]), tf.constant([3, 2])))


def test_a_model_saved_with_a_distributed_optimizer_loads_with_the_plain_one(tmp_path):
    import keras
    import numpy as np

    ctf.init()  # nothing set: a communicator of one
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=ctf.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
        model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
        model.save(tmp_path / "model.keras")
    finally:
        ctf.shutdown()
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is keras.optimizers.SGD
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights()))


def test_the_example_trains_on_2_workers_and_a_reducer(run_ranks):
    results = run_ranks(EXAMPLE.read_text(), 2, env=TF_ENV, reducers=1, timeout=240,
                        args=["--epochs", "1", "--steps-per-epoch", "4", "--batch", "4", "--width", "16",
                              "--sample", "20"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "samples/s over 2 workers, allreduce by reduction_server" in results[0].stdout, results[0].stdout
