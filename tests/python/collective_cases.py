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
    if kind in ROOTED_AND_POINT_TO_POINT:
        return _run_rooted_or_p2p(comm, case, what)
    raise ValueError(f"unknown collective {kind}")


ROOTED_AND_POINT_TO_POINT = ("reduce", "gather", "scatter", "alltoall", "sendrecv")


def alltoall_splits(case, size):
    """splits[i][j]: rows (of 3 elements) that rank i sends rank j; some zero, all different."""
    rng = np.random.default_rng([case["seed"], 999])
    return rng.integers(0, case["count"] + 1, size=(size, size)).tolist()


def _run_rooted_or_p2p(comm, case, what):
    kind, size, rank = case["collective"], comm.size, comm.rank
    root = case.get("root", 0)
    if kind == "reduce":
        x = make_input(case, rank)
        out = comm.reduce_async(x, root=root, op=case["op"]).wait() if case.get("async") else \
            comm.reduce(x, root=root, op=case["op"])
        problems = [] if out is x else [f"{what}: reduce did not return its buffer"]
        want = expected_allreduce(case, size) if rank == root else make_input(case, rank)
        return problems + check_equal(what, x, want)
    if kind == "gather":
        out = comm.gather(make_input(case, rank), root=root)
        if rank != root:
            return [] if out is None else [f"{what}: gather returned {type(out).__name__} on a non-root"]
        return check_equal(what, out, np.stack([make_input(case, r) for r in range(size)]).reshape(size, -1))
    if kind == "scatter":
        count = case["count"]
        rows = make_input(dict(case, count=size * count), root, shape=(size, count))
        if rank == root:
            out = comm.scatter(rows, root=root)
        else:  # the other ranks give only where their row goes
            out = comm.scatter(None, root=root, out=np.full(count, 7, rows.dtype))
        return check_equal(what, out, rows[rank])
    if kind == "alltoall":
        splits = alltoall_splits(case, size)
        def block(i):  # rank i's input: its blocks for every rank, in rank order
            return make_input(dict(case, count=3 * sum(splits[i])), i, shape=(sum(splits[i]), 3))
        x = block(rank)
        if case.get("even"):
            k = case["count"]
            x = make_input(dict(case, count=3 * k * size), rank, shape=(k * size, 3))
            want = np.concatenate([make_input(dict(case, count=3 * k * size), j, shape=(k * size, 3))[rank * k:(rank + 1) * k]
                                   for j in range(size)])
            return check_equal(what, comm.alltoall(x), want)
        out = comm.alltoall(x, send_splits=splits[rank], recv_splits=[splits[j][rank] for j in range(size)])
        want = np.concatenate([block(j)[sum(splits[j][:rank]):sum(splits[j][:rank + 1])] for j in range(size)])
        return check_equal(what, out, want)
    if kind == "sendrecv":
        # A ring: each rank sends its right neighbour tags 5, 9, 9; the neighbour takes 9, 5, 9
        # (another order than sent, across tags), then everyone sends to everyone.
        right, left = (rank + 1) % size, (rank - 1) % size
        if size == 1:
            return []
        msgs = {t: [make_input(dict(case, seed=case["seed"] + 10 * t + i), rank) for i in range(2)] for t in (5, 9)}
        sends = [comm.send_async(msgs[5][0], right, tag=5), comm.send_async(msgs[9][0], right, tag=9),
                 comm.send_async(msgs[9][1], right, tag=9)]
        problems = []
        got = {}
        for t, i in ((9, 0), (5, 0), (9, 1)):
            x = np.zeros_like(msgs[5][0])
            assert comm.recv(x, left, tag=t) == left
            problems += check_equal(f"{what} tag {t} #{i}", x,
                                    make_input(dict(case, seed=case["seed"] + 10 * t + i), left))
        for w in sends:
            w.wait()
        works = [(comm.recv_async(np.zeros_like(msgs[5][0]), src), src) for src in range(size) if src != rank]
        for dst in range(size):
            if dst != rank:
                comm.send(make_input(case, rank), dst)
        for w, src in works:
            problems += check_equal(f"{what} from {src}", w.wait(), make_input(case, src))
        return problems
    raise ValueError(kind)


def rooted_matrix(size, counts):
    """reduce (every dtype and op), gather, scatter, alltoall (even and uneven) and tagged
    send/recv, over every root."""
    cases = []
    seed = 10_000
    for dtype in DTYPES:
        for op in valid_ops(dtype):
            for count in counts:
                seed += 1
                cases.append(dict(collective="reduce", dtype=dtype, op=op, count=count, root=seed % size, seed=seed))
        for root in range(size):
            for kind in ("gather", "scatter"):
                seed += 1
                cases.append(dict(collective=kind, dtype=dtype, op="sum", count=counts[(seed % len(counts))], root=root,
                                  seed=seed))
        for count in (0, 1, 5, 70001):
            seed += 1
            cases.append(dict(collective="alltoall", dtype=dtype, op="sum", count=count, seed=seed))
        seed += 1
        cases.append(dict(collective="alltoall", dtype=dtype, op="sum", count=7, seed=seed, even=True))
        seed += 1
        cases.append(dict(collective="sendrecv", dtype=dtype, op="sum", count=counts[seed % len(counts)], seed=seed))
    cases.append(dict(collective="reduce", dtype="float32", op="sum", count=1000, root=size - 1, seed=seed + 1,
                      **{"async": True}))
    return cases


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
