"""collectives.tf's two paths, per-call latency of ctf.allreduce: the custom ops against
tf.numpy_function (COLLECTIVES_TF_OPS=custom|numpy), eagerly and inside tf.function, for a few
sizes, in one run (jobs of the two paths alternate, --pairs times)::

    .venv-tf/bin/python benchmarks/tf_ops.py [--ranks 2] [--sizes 4K,256K,4M,32M] [--pairs 3]

Each job is `mpirun -np RANKS` of this file with --worker. A sample is `iters` all-reduces of one
float32 tensor after a barrier (iters: ~0.2 s worth); its per-call time is the slowest rank's.
A job's figure is its median sample; the table gives the median over the jobs of each path and
numpy/custom (above 1: the custom ops are faster). One host: loopback figures.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _common import parse_size


def worker(sizes, rounds):
    import numpy as np
    import tensorflow as tf

    import collectives.tf as ctf

    comm = ctf.init()
    graph_allreduce = tf.function(ctf.allreduce)
    rows = []
    for nbytes in sizes:
        x = tf.constant(np.ones(nbytes // 4, np.float32))
        for mode, call in (("eager", ctf.allreduce), ("tf.function", graph_allreduce)):
            for _ in range(3):  # warm up: traces, builds, connections
                call(x).numpy()
            start = time.perf_counter()
            call(x).numpy()
            iters = int(comm.allreduce(np.array([min(200.0, 0.2 / (time.perf_counter() - start))]),
                                       op="min")[0]) or 1
            samples = []
            for _ in range(rounds):
                comm.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    out = call(x)
                out.numpy()
                per_call = (time.perf_counter() - start) / iters
                samples.append(float(comm.allreduce(np.array([per_call]), op="max")[0]))
            rows.append({"bytes": nbytes, "mode": mode, "iters": iters, "time_s": statistics.median(samples)})
    if comm.rank == 0:
        print("RESULT " + json.dumps({"ops": ctf.ops_in_use(), "rows": rows}))
    ctf.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sizes", default="4K,256K,4M,32M")
    parser.add_argument("--pairs", type=int, default=3, help="jobs of each path, alternating")
    parser.add_argument("--rounds", type=int, default=5, help="timed samples per size and mode in a job")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.worker:
        worker(sizes, args.rounds)
        return
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or "mpirun"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    times = {}  # (ops, bytes, mode) -> per-job medians
    for _ in range(args.pairs):
        for ops in ("custom", "numpy"):
            out = subprocess.run([mpirun, "--oversubscribe", "-np", str(args.ranks), sys.executable, __file__,
                                  "--worker", "--sizes", args.sizes, "--rounds", str(args.rounds)],
                                 env={**env, "COLLECTIVES_TF_OPS": ops}, capture_output=True, text=True, timeout=600)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"the {ops} job failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            result = json.loads(lines[0][len("RESULT "):])
            assert result["ops"] == ops, result
            for row in result["rows"]:
                times.setdefault((ops, row["bytes"], row["mode"]), []).append(row["time_s"])
    print(f"ctf.allreduce per call, {args.ranks} ranks on one host, float32; median of {args.pairs} jobs per path "
          f"(load: {os.getloadavg()[0]:.1f})")
    print(f"{'bytes':>10} {'mode':>12} {'custom us':>10} {'numpy us':>10} {'numpy/custom':>13}")
    rows = []
    for nbytes in sizes:
        for mode in ("eager", "tf.function"):
            custom = statistics.median(times[("custom", nbytes, mode)])
            numpy_ = statistics.median(times[("numpy", nbytes, mode)])
            rows.append({"bytes": nbytes, "mode": mode, "custom_s": custom, "numpy_s": numpy_,
                         "custom_jobs_s": times[("custom", nbytes, mode)], "numpy_jobs_s": times[("numpy", nbytes, mode)]})
            print(f"{nbytes:>10} {mode:>12} {custom * 1e6:>10.1f} {numpy_ * 1e6:>10.1f} {numpy_ / custom:>13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
