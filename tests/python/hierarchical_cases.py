"""The hierarchical all-reduce's and reduce-scatter's reduction order, computed in numpy, and the
rank processes' script of test_hierarchical.py.

The order (README, "Hierarchical all-reduce"): every ring of the plan reduces a block in ring
order. The buffer is first cut into pieces (``pieces``: count * itemsize // 1 MiB of them, at
least 1 and at most 16, near-equal), and each piece is reduced as the plan reduces a buffer of
its own (the levels are pipelined piece by piece). In a group of n members (ring order 0..n-1),
the block that member b ends with is ``x[b+1] + x[b+2] + ... + x[n-1] + x[0] + ... + x[b]``
(indices mod n), added left to right, each addition in the buffer's dtype: the reduce-scatter's
first message carries member b+1's data, and each member adds its own to what arrives. Level by
level, the "x" of a level are the block sums of the level below; the top's all-reduce is the
same reduce-scatter (then an all-gather). numpy computes the same order here, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import numpy as np

import collective_cases


def even_blocks(count: int, blocks: int) -> List[int]:
    """ring.h's even_blocks: the first count % blocks blocks hold one element more."""
    base, extra = divmod(count, blocks)
    return [b * base + min(b, extra) for b in range(blocks + 1)]


MIN_PIECE_BYTES, MAX_PIECES = 1 << 20, 16  # csrc/algorithms/hierarchy.h


def piece_count(nbytes: int) -> int:
    """Hierarchy::piece_count: how many pieces `nbytes` are pipelined over."""
    return min(max(nbytes // MIN_PIECE_BYTES, 1), MAX_PIECES)


def pieces(count: int, itemsize: int) -> List[int]:
    """Hierarchy::pieces: the offsets of the pieces the levels are pipelined over."""
    return even_blocks(count, piece_count(count * itemsize))


def ring_block(values: Sequence[np.ndarray], b: int) -> np.ndarray:
    """The block member b of a ring ends its reduce-scatter with, summed in ring order."""
    n = len(values)
    total = values[(b + 1) % n].copy()
    for i in range(2, n + 1):
        total = values[(b + i) % n] + total
    return total


def hierarchical_sum(inputs: Sequence[np.ndarray], plan) -> np.ndarray:
    """What the hierarchical all-reduce of `inputs` (one array per rank) gives under `plan`
    (collectives.hierarchical.plan), in its order: piece by piece."""
    offsets = pieces(len(inputs[0]), inputs[0].itemsize)
    return np.concatenate([piece_sum([x[lo:hi] for x in inputs], plan) for lo, hi in zip(offsets, offsets[1:])])


def piece_sum(inputs: Sequence[np.ndarray], plan) -> np.ndarray:
    """One piece through `plan`, as a buffer of its own."""
    count = len(inputs[0])
    buffers = [x.copy() for x in inputs]
    ranges = {rank: (0, count) for rank in range(len(inputs))}
    *below, top = plan.levels
    for level in below:
        parts = level.parts
        for group in level.groups:
            lo, hi = ranges[group[0]]
            offsets = [lo + o for o in even_blocks(hi - lo, parts)]
            for b in range(parts):
                part = slice(offsets[b], offsets[b + 1])
                buffers[group[b]][part] = ring_block([buffers[m][part] for m in group], b)
            for b in range(parts):
                ranges[group[b]] = (offsets[b], offsets[b + 1])
    result = np.empty_like(inputs[0])
    for group in top.groups:
        lo, hi = ranges[group[0]]
        offsets = [lo + o for o in even_blocks(hi - lo, len(group))]
        for b in range(len(group)):
            part = slice(offsets[b], offsets[b + 1])
            result[part] = ring_block([buffers[m][part] for m in group], b)
    return result


def final_blocks(plan, size: int) -> List[int]:
    """Hierarchy::final_block of every rank of a uniform plan: its positions in its groups, level
    by level, as the digits of a number (the host's the most significant), each level's base its
    group size."""
    blocks = [0] * size
    for level in plan.levels:
        for group in level.groups:
            for position, rank in enumerate(group):
                blocks[rank] = blocks[rank] * len(group) + position
    return blocks


def hierarchical_reduce_scatter(inputs: Sequence[np.ndarray], plan, rank: int) -> np.ndarray:
    """What the hierarchical reduce-scatter of `inputs` (size x count elements per rank) gives
    `rank` under a uniform `plan`: hierarchical_collectives.cc's working layout (rank q's slice i
    at slot final_blocks[q] of piece i), each piece summed as the plan sums it; the element's
    order does not depend on the pieces."""
    size, count = len(inputs), len(inputs[0]) // len(inputs)
    slices = even_blocks(count, min(count, piece_count(size * count * inputs[0].itemsize)))
    blocks, parts = final_blocks(plan, size), []
    for lo, hi in zip(slices, slices[1:]):
        works = []
        for x in inputs:
            work = np.empty(size * (hi - lo), x.dtype)
            for q in range(size):
                work[blocks[q] * (hi - lo):(blocks[q] + 1) * (hi - lo)] = x[q * count + lo:q * count + hi]
            works.append(work)
        parts.append(piece_sum(works, plan)[blocks[rank] * (hi - lo):(blocks[rank] + 1) * (hi - lo)])
    return np.concatenate(parts)


def order_sensitive(case, rank: int) -> np.ndarray:
    """Exponents far apart: the sum's bits depend on the order of the additions."""
    rng = np.random.default_rng([case["seed"], rank])
    values = np.ldexp(rng.uniform(-1, 1, case["count"]), rng.integers(-20, 21, case["count"]))
    return values.astype(case["dtype"])


def run_order_case(comm, case) -> List[str]:
    from collectives import hierarchical

    x = order_sensitive(case, comm.rank)
    comm.allreduce(x)
    want = hierarchical_sum([order_sensitive(case, r) for r in range(comm.size)], hierarchical.plan(comm.topology))
    return collective_cases.check_equal(f"rank {comm.rank}: order, {collective_cases.describe(case)}", x, want)


def run_reduce_scatter_order_case(comm, case) -> List[str]:
    """An order-sensitive reduce-scatter of size x count elements against the plan's order."""
    from collectives import hierarchical

    full = {**case, "count": case["count"] * comm.size}
    out = comm.reduce_scatter(order_sensitive(full, comm.rank))
    inputs = [order_sensitive(full, r) for r in range(comm.size)]
    want = hierarchical_reduce_scatter(inputs, hierarchical.plan(comm.topology), comm.rank)
    return collective_cases.check_equal(f"rank {comm.rank}: reduce-scatter order, {collective_cases.describe(case)}",
                                        out, want)


def run_subgroups(comm) -> List[str]:
    """A subgroup of the first three ranks and the evens, each all-reducing beside the world."""
    problems, report = [], {}
    trio = comm.create_group([0, 1, 2]) if comm.rank < 3 else None
    evens = comm.split(0 if comm.rank % 2 == 0 else None)
    for name, sub, members in (("trio", trio, [0, 1, 2]), ("evens", evens, list(range(0, comm.size, 2)))):
        if sub is None:
            continue
        report[name] = sub.algorithm
        for count in (1, 13, 100003):
            x = np.arange(count, dtype=np.int64) * (comm.rank + 1)
            sub.allreduce(x)
            want = np.arange(count, dtype=np.int64) * sum(r + 1 for r in members)
            problems += collective_cases.check_equal(f"rank {comm.rank}: {name} count {count}", x, want)
        sub.close()
    return problems, report


# The rank processes' script: the cases in the JSON file named by its argument; "order" and
# "reduce_scatter_order" cases here, the rest by collective_cases; "subgroups" runs run_subgroups.
RANK_SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import collective_cases, hierarchical_cases
import collectives as cc

cases = json.loads(open(sys.argv[1]).read())
with cc.init() as comm:
    problems, report = [], {{}}
    for case in cases:
        if case["collective"] == "order":
            problems += hierarchical_cases.run_order_case(comm, case)
        elif case["collective"] == "reduce_scatter_order":
            problems += hierarchical_cases.run_reduce_scatter_order_case(comm, case)
        elif case["collective"] == "subgroups":
            found, report["subgroups"] = hierarchical_cases.run_subgroups(comm)
            problems += found
        else:
            problems += collective_cases.run_case(comm, case)
    report.update(rank=comm.rank, algorithm=comm.algorithm, topology=comm.topology, problems=problems[:20])
    print(json.dumps(report))
"""


def run_job(run_ranks, tmp_path, size, cases, topologies, env=None, timeout=180):
    """`cases` in one job of `size` ranks, rank r with COLLECTIVES_TOPOLOGY=topologies[r];
    fails on any problem; returns each rank's report."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    results = run_ranks(RANK_SCRIPT, size, args=[str(path)], env=env, timeout=timeout,
                        rank_env=lambda r: {"COLLECTIVES_TOPOLOGY": topologies[r]})
    reports = []
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"
        report = result.report()
        assert report["problems"] == [], "\n".join(report["problems"])
        reports.append(report)
    return reports
