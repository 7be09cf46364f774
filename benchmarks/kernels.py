"""Memory bandwidth of the CPU reduction kernels (op sum), against numpy's float32 add.

Each row times ``reduce_into(a, b)`` on arrays of --mib MiB each, far larger than the last-level
cache, and numpy's ``np.add(x, y, out=x)`` on float32 arrays of the same size in the same run,
alternating the two (ours, numpy, ours, numpy, ...). Both move 3x the array bytes per call (two
reads, one write); GB/s = 1e9 bytes/s. The ratio column is the median of the per-repeat ratios
numpy_time / our_time. Every timed call's result is checked against numpy (#wrong).

    python benchmarks/kernels.py [--mib 128] [--repeats 7] [--json FILE]
"""

import argparse
import json
import platform
import statistics
import sys
import time

import ml_dtypes
import numpy as np

from collectives import _core

KERNELS = _core.kernels
DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int32": np.int32,
    "int64": np.int64,
}
# The performance bar: the best level's sum bandwidth as a fraction of numpy float32 add's.
BARS = {"float32": 0.80, "float16": 0.50, "bfloat16": 0.50}


def random_array(dtype, count, rng):
    """Finite random values (so results compare exactly, bit for bit)."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
    return rng.uniform(-1000.0, 1000.0, size=count).astype(np.float32).astype(dtype)


def expected_sum(a, b):
    """numpy's sum, rounded like the kernels: half types through float32, rounded once."""
    if a.dtype == ml_dtypes.bfloat16:
        return (a.astype(np.float32) + b.astype(np.float32)).astype(ml_dtypes.bfloat16)
    with np.errstate(over="ignore"):
        return a + b


def bits(x):
    return x.view(f"u{x.dtype.itemsize}")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn):
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e9


class NumpyBaseline:
    """np.add(x, y, out=x) on float32 arrays of the same byte size, checked each call."""

    def __init__(self, nbytes, rng):
        count = nbytes // 4
        self.x0 = random_array(np.float32, count, rng)
        self.y = random_array(np.float32, count, rng)
        self.want = self.x0 + self.y
        self.x = self.x0.copy()

    def run(self):
        np.copyto(self.x, self.x0)
        seconds = timed(lambda: np.add(self.x, self.y, out=self.x))
        return seconds, int(np.count_nonzero(bits(self.x) != bits(self.want)))


def bench_row(dtype_name, level, nbytes, repeats, baseline, rng):
    dtype = DTYPES[dtype_name]
    count = nbytes // np.dtype(dtype).itemsize
    a0 = random_array(dtype, count, rng)
    b = random_array(dtype, count, rng)
    want = bits(expected_sum(a0, b))
    a = a0.copy()

    def ours():
        KERNELS.reduce_into(a.ctypes.data, b.ctypes.data, count, dtype_name, "sum", level)

    ours()  # warm up (and fault in) once before timing
    baseline.run()
    ours_s, numpy_s, ratios, wrong = [], [], [], 0
    for _ in range(repeats):
        np.copyto(a, a0)
        t = timed(ours)
        wrong += int(np.count_nonzero(bits(a) != want))
        t_np, wrong_np = baseline.run()
        wrong += wrong_np
        ours_s.append(t)
        numpy_s.append(t_np)
        ratios.append(t_np / t)  # equal bytes moved, so the time ratio is the GB/s ratio
    moved = 3 * a.nbytes
    return {
        "dtype": dtype_name,
        "op": "sum",
        "level": level,
        "bytes_per_array": a.nbytes,
        "gbps": moved / statistics.median(ours_s) / 1e9,
        "numpy_f32_gbps": moved / statistics.median(numpy_s) / 1e9,
        "ratio_vs_numpy_f32": statistics.median(ratios),
        "wrong": wrong,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="MiB per array (default 128)")
    parser.add_argument("--repeats", type=int, default=7, help="paired repeats (default 7)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--levels", nargs="+", default=KERNELS.levels(),
                        help="SIMD levels (default: all this CPU supports)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for level in args.levels:
        if level not in KERNELS.levels():
            parser.error(f"level {level} not supported here (supported: {KERNELS.levels()})")

    nbytes = args.mib << 20
    rng = np.random.default_rng(0)
    baseline = NumpyBaseline(nbytes, rng)
    best = KERNELS.best_level()
    print(f"{args.mib} MiB per array, {args.repeats} paired repeats, best level {best}, "
          f"numpy {np.__version__}, {cpu_model()}")
    print(f"{'dtype':<9} {'op':<4} {'level':<7} {'GB/s':>7} {'numpy f32':>10} "
          f"{'ratio':>6} {'#wrong':>7}")
    rows = []
    for dtype_name in args.dtypes:
        for level in args.levels:
            row = bench_row(dtype_name, level, nbytes, args.repeats, baseline, rng)
            rows.append(row)
            print(f"{row['dtype']:<9} {row['op']:<4} {row['level']:<7} {row['gbps']:7.2f} "
                  f"{row['numpy_f32_gbps']:10.2f} {row['ratio_vs_numpy_f32']:6.2f} "
                  f"{row['wrong']:7d}", flush=True)

    bars = []
    for row in rows:
        if row["level"] == best and row["dtype"] in BARS:
            need = BARS[row["dtype"]]
            ok = row["ratio_vs_numpy_f32"] >= need
            bars.append({"dtype": row["dtype"], "level": best, "need": need,
                         "ratio": row["ratio_vs_numpy_f32"], "pass": ok})
            print(f"bar: {row['dtype']} sum ({best}) {row['ratio_vs_numpy_f32']:.2f} of numpy "
                  f"float32 add, need >= {need:.2f}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "repeats": args.repeats, "best_level": best,
                       "numpy": np.__version__, "cpu": cpu_model(), "rows": rows,
                       "bars": bars}, f, indent=2)
    failed = any(row["wrong"] for row in rows) or not all(bar["pass"] for bar in bars)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
