"""Trains a small Keras 3 character language model data-parallel with collectives.tf.

The text is the collectives package's own Python source, so nothing is downloaded; each
worker trains on its own shard of it with model.fit, and DistributedOptimizer averages the
gradients over the workers (the ring, or reducers when the job has them) in fused buckets.
Rank 0 shows Keras' progress bar and prints a sample of generated text at the end.

    export COLLECTIVES_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
    mpirun -np 4 python examples/tf_keras.py

    # all-reduces served by 2 reducers (CPU-only processes, here on the same machine):
    mpirun -np 4 python examples/tf_keras.py : -np 2 collectives-reducer

    # without mpirun: COLLECTIVES_RANK/SIZE/RENDEZVOUS, as for any collectives job
    for i in 1 2; do collectives-reducer --rendezvous 127.0.0.1:29600 & done
    for r in 0 1 2 3; do COLLECTIVES_RANK=$r COLLECTIVES_SIZE=4 COLLECTIVES_RENDEZVOUS=127.0.0.1:29600 \\
        COLLECTIVES_NUM_REDUCERS=2 python examples/tf_keras.py & done; wait

Needs TensorFlow 2.21 or later (pip install tensorflow-cpu, or the `tf` extra).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import keras

import collectives
import collectives.tf as ctf


def corpus() -> str:
    """The collectives package's Python source: real text that ships with it."""
    return "\n".join(path.read_text() for path in sorted(Path(collectives.__file__).parent.rglob("*.py")))


def windows(data: np.ndarray, context: int, count: int, rank: int, size: int):
    """This worker's shard of ``count`` (context characters, the next one): every size-th
    window of those that start every context // 2 characters."""
    starts = np.arange(0, len(data) - context - 1, context // 2)[rank::size][:count]
    return np.stack([data[s:s + context] for s in starts]), data[starts + context]


def language_model(vocab: int, context: int, width: int) -> keras.Model:
    return keras.Sequential([
        keras.Input((context,), dtype="int32"),
        keras.layers.Embedding(vocab, width),
        keras.layers.Conv1D(width, 5, padding="causal", activation="relu"),
        keras.layers.LSTM(width),
        keras.layers.Dense(vocab),
    ])


def sample(model: keras.Model, prompt: np.ndarray, length: int) -> np.ndarray:
    tokens = list(prompt)
    context = len(prompt)
    next_logits = tf.function(lambda window: model(window, training=False)[0])  # traced once
    for _ in range(length):
        logits = np.asarray(next_logits(np.array([tokens[-context:]], np.int32)), np.float64)
        p = np.exp(logits - np.max(logits))
        tokens.append(int(np.random.default_rng(len(tokens)).choice(len(p), p=p / p.sum())))
    return np.array(tokens)


class Throughput(keras.callbacks.Callback):
    """The job's samples per second, from the end of the first step (which traces the
    training function) to the end of the last."""

    def __init__(self, samples_per_step: int):
        super().__init__()
        self.samples_per_step, self.steps, self.started, self.rate = samples_per_step, 0, None, 0.0

    def on_train_batch_end(self, batch, logs=None):
        if self.started is None:
            self.started = time.perf_counter()
            return
        self.steps += 1
        self.rate = self.steps * self.samples_per_step / (time.perf_counter() - self.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="at most (the text may run out)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per worker and step")
    parser.add_argument("--context", type=int, default=48, help="characters per sequence")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sample", type=int, default=200, help="characters of text generated at the end")
    parser.add_argument("--bucket-bytes", type=int, default=ctf.DEFAULT_BUCKET_BYTES,
                        help="the most gradient bytes fused into one all-reduce")
    args = parser.parse_args()

    comm = ctf.init()  # mpirun, torchrun or COLLECTIVES_*; reducers of the job included
    rank, size = ctf.rank(), ctf.size()
    text = corpus()
    alphabet = sorted(set(text))
    data = np.array([alphabet.index(c) for c in text], dtype=np.int32)
    x, y = windows(data, args.context, args.steps_per_epoch * args.batch, rank, size)

    keras.utils.set_random_seed(rank)  # each its own; the callback below gives all rank 0's weights
    model = language_model(len(alphabet), args.context, args.width)
    optimizer = ctf.DistributedOptimizer(keras.optimizers.Adam(args.lr), bucket_bytes=args.bucket_bytes)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    throughput = Throughput(args.batch * size)
    history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=1 if rank == 0 else 0,
                        callbacks=[ctf.callbacks.BroadcastGlobalVariablesCallback(0),
                                   ctf.callbacks.MetricAverageCallback(), throughput])
    if rank == 0:
        print(f"epoch {args.epochs}: loss {history.history['loss'][-1]:.3f} (averaged over the workers), "
              f"{throughput.rate:.0f} samples/s over {size} workers, allreduce by {comm.algorithm}")
        prompt = data[:args.context]
        print("sample:\n" + "".join(alphabet[i] for i in sample(model, prompt, args.sample)))
    ctf.shutdown()


if __name__ == "__main__":
    main()
