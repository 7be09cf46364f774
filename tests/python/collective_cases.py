"""Test cases for the collectives, shared by the pytest driver and the rank processes.

A case is a small JSON-able dict; every rank derives every rank's input from the case's seed,
so each rank checks its own result against numpy without shipping arrays between processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64")
FLOATING = ("float16", "bfloat16", "float32", "float64")
OPS = ("sum", "avg", "min", "max", "prod")


def numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def valid_ops(dtype):
    return OPS if dtype in FLOATING else tuple(op for op in OPS if op != "avg")


def make_input(case, rank, shape=None):
    """Rank `rank`'s input. Floats are small integers, so every sum and product the ring can
    form (in any order, in the dtype) is exact and the result equals numpy's bit for bit;
    integers span their whole range, so wrap-around is exercised."""
    rng = np.random.default_rng([case["seed"], rank])
    dtype = numpy_dtype(case["dtype"])
    count = case["count"]
    if case["dtype"] in FLOATING:
        values = rng.integers(-3, 4, size=count).astype(np.float32).astype(dtype)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
    return values.reshape(shape) if shape is not None else values


def expected_allreduce(case, size):
    inputs = [make_input(case, r) for r in range(size)]
    dtype = numpy_dtype(case["dtype"])
    op = case["op"]
    if op in ("min", "max"):
        fold = np.minimum if op == "min" else np.maximum
        result = inputs[0]
        for x in inputs[1:]:
            result = fold(result, x)
        return result
    if case["dtype"] in FLOATING:
        wide = [x.astype(np.float64) for x in inputs]  # exact for these small integers
        total = np.prod(wide, axis=0) if op == "prod" else np.sum(wide, axis=0)
        if op == "avg":
            # One division of the sum, in float32 for the half types (as the core does).
            compute = np.float64 if case["dtype"] == "float64" else np.float32
            return (total.astype(compute) / compute(size)).astype(dtype)
        return total.astype(dtype)
    # Integers wrap modulo 2**bits: fold in the dtype itself, as numpy does.
    result = inputs[0].copy()
    with np.errstate(over="ignore"):
        for x in inputs[1:]:
            result = result * x if op == "prod" else result + x
    return result


def describe(case):
    return ", ".join(f"{k}={v}" for k, v in case.items())


def check_equal(what, got, want):
    got = np.asarray(got)
    if got.shape != want.shape or got.dtype != want.dtype:
        return [f"{what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}"]
    # Bit for bit: -0.0 is not 0.0, and a NaN must be the same NaN.
    bits = np.dtype(f"u{got.dtype.itemsize}")
    wrong = np.flatnonzero(got.view(bits).ravel() != want.view(bits).ravel())
    if wrong.size:
        first = wrong[0]
        return [f"{what}: {wrong.size} wrong elements, first at {first}: "
                f"got {got.ravel()[first]!r}, want {want.ravel()[first]!r}"]
    return []


def run_case(comm, case):
    """Runs one case on this rank; returns the list of problems found (empty: passed)."""
    kind = case["collective"]
    size, rank = comm.size, comm.rank
    what = f"rank {rank}: {describe(case)}"
    if kind == "allreduce":
        x = make_input(case, rank)
        if case.get("async"):
            out = comm.allreduce_async(x, op=case["op"]).wait()
        else:
            out = comm.allreduce(x, op=case["op"])
        problems = [] if out is x else [f"{what}: allreduce did not return its buffer"]
        return problems + check_equal(what, x, expected_allreduce(case, size))
    if kind == "same_bits":
        # Order-sensitive inputs (far-apart exponents, zeros of both signs): whatever order the
        # algorithm reduces in, every rank must end with the same bits.
        rng = np.random.default_rng([case["seed"], rank])
        values = np.ldexp(rng.uniform(-1, 1, case["count"]), rng.integers(-20, 21, case["count"]))
        values[rng.random(case["count"]) < 0.1] = -0.0
        x = values.astype(numpy_dtype(case["dtype"]))
        comm.allreduce(x, op=case["op"])
        rows = comm.allgather(x)
        bits = np.dtype(f"u{x.dtype.itemsize}")
        differ = [r for r in range(size) if not np.array_equal(rows[r].view(bits), x.view(bits))]
        return [f"{what}: rank(s) {differ} ended with other bits"] if differ else []
    if kind == "allgather":
        x = make_input(case, rank)
        out = comm.allgather(x)
        want = np.stack([make_input(case, r) for r in range(size)]) if case["count"] else np.empty((size, 0), x.dtype)
        return check_equal(what, out, want)
    if kind == "broadcast":
        x = make_input(case, rank)
        comm.broadcast(x, root=case["root"])
        return check_equal(what, x, make_input(case, case["root"]))
    if kind == "reduce_scatter":
        rows = case["count"] // 3
        x = make_input(case, rank, shape=(rows, 3))
        out = comm.reduce_scatter(x, op=case["op"])
        full = expected_allreduce(case, size).reshape(rows, 3)
        k = rows // size
        return check_equal(what, out, full[rank * k:(rank + 1) * k])
    raise ValueError(f"unknown collective {kind}")


def matrix(size, counts):
    """Every dtype and op at every count, plus the other collectives: one job's worth."""
    cases = []
    seed = 0
    for dtype in DTYPES:
        for op in valid_ops(dtype):
            for count in counts:
                seed += 1
                cases.append(dict(collective="allreduce", dtype=dtype, op=op, count=count, seed=seed))
        seed += 1
        cases.append(dict(collective="allgather", dtype=dtype, op="sum", count=counts[-2], seed=seed))
        for root in range(size):
            seed += 1
            cases.append(dict(collective="broadcast", dtype=dtype, op="sum", count=counts[-1], root=root, seed=seed))
        seed += 1
        cases.append(dict(collective="reduce_scatter", dtype=dtype, op=valid_ops(dtype)[-1],
                          count=3 * size * 101, seed=seed))
    cases.append(dict(collective="allreduce", dtype="float32", op="sum", count=1000, seed=seed + 1, **{"async": True}))
    seed += 1
    for dtype in FLOATING:
        for op in ("sum", "min", "max"):
            for count in (7, counts[-1]):  # latency- and bandwidth-bound algorithms
                seed += 1
                cases.append(dict(collective="same_bits", dtype=dtype, op=op, count=count, seed=seed))
    return cases


# The rank processes' script: runs the cases in the JSON file named by its argument.
RANK_SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})  # collective_cases only: the tests folder holds no package
import collective_cases
import collectives as cc

cases = json.loads(open(sys.argv[1]).read())
with cc.init() as comm:
    problems = []
    for case in cases:
        problems += collective_cases.run_case(comm, case)
    print(json.dumps({{"rank": comm.rank, "size": comm.size, "cases": len(cases), "problems": problems[:20]}}))
"""


def run_job(run_ranks, tmp_path, size, cases, env=None, timeout=240, reducers=0):
    """Runs `cases` in one job of `size` processes (and `reducers` reducers) started by the
    run_ranks fixture; fails the test with every problem a rank found."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    results = run_ranks(RANK_SCRIPT, size, args=[str(path)], env=env, timeout=timeout, reducers=reducers)
    for rank, result in enumerate(results[:size]):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"
        report = result.report()
        assert report["cases"] == len(cases) and report["size"] == size
        assert report["problems"] == [], "\n".join(report["problems"])
    for index, result in enumerate(results[size:]):
        assert result.returncode == 0, f"reducer {index} failed:\n{result.stderr[-4000:]}"
