"""The hierarchical all-reduce (issue 12) on real processes: its planner, its results against
numpy (integer-valued data, where the order cannot matter, and order-sensitive floats against
numpy computing its documented order), uneven layouts, every transport, subgroups, auto's choice,
and a killed rank; all-gather, reduce-scatter and broadcast over the plan.

All ranks run on this one machine; per-rank COLLECTIVES_TOPOLOGY values make them different
hosts of the label tree ("rackA/<hostname>" and "rackB/<hostname>" are two hosts in two racks),
while the transports still find that they share memory.
"""

import json
import re
import signal
import time

import pytest

import collective_cases as cases_lib
import hierarchical_cases

FORCED = {"COLLECTIVES_ALGORITHM": "hierarchical"}


# Counts that the levels pipeline over several pieces (hierarchical_cases.pieces): 3 pieces of
# float32, 2 of float64, 16 (the most) of float64.
PIECED = (786_433, 300_007)


def cases(counts, dtypes=cases_lib.DTYPES, order_counts=(1, 13, 4099, 65537) + PIECED):
    """All-reduces of every op of `dtypes` at `counts`, and the order-sensitive float sums."""
    found, seed = [], 0
    for dtype in dtypes:
        for op in cases_lib.valid_ops(dtype):
            for count in counts:
                seed += 1
                found.append(dict(collective="allreduce", dtype=dtype, op=op, count=count, seed=seed))
    for dtype in ("float32", "float64"):
        for count in order_counts:
            seed += 1
            found.append(dict(collective="order", dtype=dtype, op="sum", count=count, seed=seed))
    seed += 1
    found.append(dict(collective="order", dtype="float64", op="sum", count=2_400_011, seed=seed))
    seed += 1
    found.append(dict(collective="same_bits", dtype="float16", op="sum", count=65537, seed=seed))
    return found


# -- the planner ------------------------------------------------------------------------------


def plan_of(labels):
    from collectives.hierarchical import plan

    p = plan(labels)
    return p.description, [(level.name, [list(g) for g in level.groups]) for level in p.levels]


def test_plan_of_two_hosts_of_four():
    assert plan_of(["h1"] * 4 + ["h2"] * 4) == (
        "hierarchical(4 ranks/host x 2 hosts)",
        [("host", [[0, 1, 2, 3], [4, 5, 6, 7]]), ("top", [[0, 4], [1, 5], [2, 6], [3, 7]])])


def test_plan_of_uneven_hosts_cuts_the_fewest_ranks_on_a_host():
    # 3 + 2: two blocks; rank 2 adds into ranks 0 and 1's blocks and sends nothing across.
    assert plan_of(["h1"] * 3 + ["h2"] * 2) == (
        "hierarchical(2-3 ranks/host x 2 hosts)", [("host", [[0, 1, 2], [3, 4]]), ("top", [[0, 3], [1, 4]])])
    assert plan_of(["h1", "h2", "h2", "h3", "h3"]) == (
        "hierarchical(1-2 ranks/host x 3 hosts)", [("host", [[0], [1, 2], [3, 4]]), ("top", [[0, 1, 3]])])


def test_plan_of_racks_of_uneven_hosts():
    description, levels = plan_of(["a/x", "a/x", "a/x", "a/y", "a/y", "b/z", "b/z"])
    assert description == "hierarchical(2-3 ranks/host x 1-2 hosts/rack x 2 racks)"
    assert levels == [("host", [[0, 1, 2], [3, 4], [5, 6]]), ("rack", [[0, 3], [1, 4], [5], [6]]),
                      ("top", [[0, 5], [1, 6]])]


def test_plan_orders_children_by_their_lowest_rank_and_leaves_out_levels_that_do_nothing():
    # Interleaved racks; one host per rack: the rack level does nothing.
    assert plan_of(["rA/h", "rB/h", "rA/h", "rB/h"]) == (
        "hierarchical(2 ranks/host x 2 racks)", [("host", [[0, 2], [1, 3]]), ("top", [[0, 1], [2, 3]])])
    assert plan_of(["h"] * 3) == ("hierarchical(3 ranks/host)", [("host", [[0, 1, 2]])])
    assert plan_of(["h1", "h2"]) == ("hierarchical(2 hosts)", [("top", [[0, 1]])])
    # Any depth; labels of different depths sit under an unnamed outer level.
    assert plan_of(["z/r1/h1", "z/r1/h2", "z/r2/h3", "z/r2/h4"])[0] == "hierarchical(2 hosts/rack x 2 racks/zone)"
    assert plan_of(["h", "r/h", "r/h"])[1] == [("host", [[0], [1, 2]]), ("top", [[0, 1]])]


def test_plan_takes_hosts_and_racks_from_the_labels_in_any_rank_order():
    # Issue 12's interleaved layout (benchmarks/compare.py --rank-order interleaved): 2 racks x
    # 4 hosts, rank i on the (i mod 8)-th of h0, h4, h1, h5, ...: consecutive ranks alternate
    # racks. The rack level rings over each rack's ranks, the top pairs one rank of each rack.
    hosts = [0, 4, 1, 5, 2, 6, 3, 7]
    labels = [f"rack{h // 4}/h{h}" for h in hosts]
    assert plan_of(labels) == ("hierarchical(4 hosts/rack x 2 racks)",
                               [("rack", [[0, 2, 4, 6], [1, 3, 5, 7]]), ("top", [[0, 1], [2, 3], [4, 5], [6, 7]])])
    # 2 ranks per host dealt out cyclically (ranks of a host are not consecutive): the host's
    # ranks still reduce-scatter together, and the same groups as in block order (renumbered).
    hosts = [0, 2, 1, 3] * 2
    labels = [f"rack{h // 2}/h{h}" for h in hosts]
    block = plan_of([f"rack{r // 4}/h{r // 2}" for r in range(8)])
    cyclic = plan_of(labels)
    assert cyclic[0] == block[0] == "hierarchical(2 ranks/host x 2 hosts/rack x 2 racks)"
    # h0 holds ranks 0 and 4, h2 (rack1) 1 and 5, h1 (rack0) 2 and 6, h3 3 and 7.
    assert cyclic[1] == [("host", [[0, 4], [1, 5], [2, 6], [3, 7]]), ("rack", [[0, 2], [1, 3], [4, 6], [5, 7]]),
                         ("top", [[0, 1], [2, 3], [4, 5], [6, 7]])]


# -- all-reduce on real processes -------------------------------------------------------------

TWO_RACKS = ["rackA", "rackA", "rackB", "rackB"]
INTERLEAVED = ["rackA", "rackB", "rackA", "rackB"]


@pytest.mark.parametrize("transport,topologies", [("auto", TWO_RACKS), ("tcp", INTERLEAVED), ("shm", TWO_RACKS)])
def test_two_racks_of_two_on_every_transport(run_ranks, tmp_path, transport, topologies):
    dtypes = cases_lib.DTYPES if transport == "auto" else ("float32", "bfloat16", "int64", "uint8")
    reports = hierarchical_cases.run_job(run_ranks, tmp_path, 4, cases([0, 1, 2, 3, 7, 13, 1009, 65537], dtypes),
                                         topologies, env={**FORCED, "COLLECTIVES_TRANSPORT": transport})
    assert {r["algorithm"] for r in reports} == {"hierarchical(2 ranks/host x 2 racks)"}


@pytest.mark.parametrize("topologies,description", [
    (["hA", "hA", "hA", "hB", "hB"], "hierarchical(2-3 ranks/host x 2 racks)"),
    (["h1", "h2", "h2", "h3", "h3"], "hierarchical(1-2 ranks/host x 3 racks)"),
    (["a/x", "a/x", "a/x", "a/y", "a/y", "b/z", "b/z"], "hierarchical(2-3 ranks/host x 1-2 racks/zone x 2 zones)"),
])
def test_uneven_layouts(run_ranks, tmp_path, topologies, description):
    reports = hierarchical_cases.run_job(
        run_ranks, tmp_path, len(topologies),
        cases([1, 2, 5, 13, 1009, 65537, PIECED[0]], ("float32", "float16", "int32", "int8"),
              order_counts=(1, 7, 65537, PIECED[0])),
        topologies, env=FORCED)
    assert {r["algorithm"] for r in reports} == {description}


def test_subgroups_plan_from_their_members_labels(run_ranks, tmp_path):
    reports = hierarchical_cases.run_job(run_ranks, tmp_path, 4, [dict(collective="subgroups")], TWO_RACKS, env=FORCED)
    for report in reports:
        expected = {}
        if report["rank"] < 3:
            expected["trio"] = "hierarchical(1-2 ranks/host x 2 racks)"  # ranks 0, 1 | 2
        if report["rank"] % 2 == 0:
            expected["evens"] = "hierarchical(2 racks)"  # ranks 0 | 2: one level, a ring
        assert report["subgroups"] == expected, report


def test_auto_takes_the_plan_for_large_messages_and_recursive_doubling_for_small(run_ranks, tmp_path):
    """Shared memory inside a host is cheap in the cost model: at 1M elements the plan beats
    the flat ring; at 8 elements recursive doubling's few messages win."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([dict(collective="allreduce", dtype="float32", op="sum", count=count, seed=count)
                                for count in (1 << 20, 8)]))
    results = run_ranks(hierarchical_cases.RANK_SCRIPT, 4, args=[str(path)], env={"COLLECTIVES_DEBUG": "1"},
                        rank_env=lambda r: {"COLLECTIVES_TOPOLOGY": TWO_RACKS[r]}, timeout=120)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        assert report["problems"] == [] and report["algorithm"] == "auto:hierarchical(2 ranks/host x 2 racks)", report
        assert re.search(r"allreduce #\d+ \(sum, 1048576 x float32\): start \(hierarchical\(2 ranks/host x 2 racks\)\)",
                         result.stderr), result.stderr[-3000:]
        assert re.search(r"allreduce #\d+ \(sum, 8 x float32\): start \(recursive_doubling\)", result.stderr)
        assert "hierarchical: reduce-scatter in the host group of 2" in result.stderr
        assert "hierarchical: all-reduce in the top group of 2" in result.stderr


# -- all-gather, reduce-scatter and broadcast over the plan --------------------------------------

# 2 ranks per host, 2 hosts per rack, 2 racks: three levels.
EIGHT = ["r1/a"] * 2 + ["r1/b"] * 2 + ["r2/c"] * 2 + ["r2/d"] * 2
UNEVEN = ["hA", "hA", "hA", "hB", "hB"]


def other_cases(size, uniform, counts=(1, 5, 1009, 70_001)):
    """Every dtype's all-gather and broadcast (every root), every op's reduce-scatter, integer-
    valued (cases_lib.run_case); on uniform plans the order-sensitive reduce-scatter against the
    plan's order. 70001 elements per rank make 2 pieces or more (hierarchical_cases.pieces)."""
    found, seed = [], 100
    for dtype in cases_lib.DTYPES:
        for count in counts:
            seed += 1
            found.append(dict(collective="allgather", dtype=dtype, op="sum", count=count, seed=seed))
            seed += 1
            found.append(dict(collective="broadcast", dtype=dtype, op="sum", count=count, root=seed % size, seed=seed))
        for op in cases_lib.valid_ops(dtype):
            seed += 1
            found.append(dict(collective="reduce_scatter", dtype=dtype, op=op, count=3 * size * counts[-1], seed=seed))
    for root in range(size):
        seed += 1
        found.append(dict(collective="broadcast", dtype="float32", op="sum", count=counts[-1], root=root, seed=seed))
    for dtype in ("float32", "float64") if uniform else ():
        for count in (1, 13) + counts[-1:]:
            seed += 1
            found.append(dict(collective="reduce_scatter_order", dtype=dtype, op="sum", count=count, seed=seed))
    return found


def tree_chain(labels, root):
    """The broadcast's chain from `root` (Hierarchy::chain_from): the label tree's order (nodes by
    their lowest rank), stably sorted by distance from the root (the same host first, then the
    same rack, ...): it enters every host and every rack once. Labels of one depth."""
    paths = [label.split("/") for label in labels]
    depth = len(paths[0])

    def place(rank):
        return tuple(min(q for q in range(len(paths)) if paths[q][:i + 1] == paths[rank][:i + 1])
                     for i in range(depth)) + (rank,)

    def distance(rank):
        shared = next((i for i in range(depth) if paths[rank][i] != paths[root][i]), depth)
        return -1 if rank == root else depth - shared

    return sorted(sorted(range(len(labels)), key=place), key=distance)


def test_tree_chain_examples():
    assert tree_chain(INTERLEAVED, 3) == [3, 1, 0, 2]
    assert tree_chain(EIGHT, 5) == [5, 4, 6, 7, 0, 1, 2, 3]
    assert tree_chain(EIGHT, 2) == [2, 3, 0, 1, 4, 5, 6, 7]
    assert tree_chain(UNEVEN, 4) == [4, 3, 0, 1, 2]


@pytest.mark.parametrize("topologies,uniform", [(TWO_RACKS, True), (INTERLEAVED, True), (EIGHT, True), (UNEVEN, False)],
                         ids=["two-racks", "interleaved", "three-levels", "uneven"])
def test_allgather_reduce_scatter_and_broadcast_over_the_plan(run_ranks, tmp_path, topologies, uniform):
    """On uniform plans all-gather and reduce-scatter take the plan (its all-gathers down, its
    reduce-scatters up); elsewhere the flat ring. The broadcast's chain runs in the tree's order
    on every plan. COLLECTIVES_DEBUG says which ran."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(other_cases(len(topologies), uniform)))
    results = run_ranks(hierarchical_cases.RANK_SCRIPT, len(topologies), args=[str(path)],
                        env={**FORCED, "COLLECTIVES_DEBUG": "1"}, timeout=240,
                        rank_env=lambda r: {"COLLECTIVES_TOPOLOGY": topologies[r]})
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.report()["problems"] == [], "\n".join(result.report()["problems"])
        chains = re.findall(r"hierarchical: chain in the tree's order:((?: \d+)+)", result.stderr)
        assert chains, result.stderr[-3000:]
        for chain in chains:
            order = [int(index) for index in chain.split()]
            assert order == tree_chain(topologies, order[0]), order
        assert ("hierarchical: all-gather in the" in result.stderr) == uniform
        assert ("hierarchical: reduce-scatter in the" in result.stderr) == uniform


FAULT_SCRIPT = r"""
import json, os, signal, sys, threading, time
import numpy as np
import collectives as cc

scenario, count = sys.argv[1], int(sys.argv[2])
result = {"rank": int(os.environ["COLLECTIVES_RANK"])}
try:
    comm = cc.init()
    x = np.ones(count, dtype=np.float32)
    for step in range(5):
        if scenario == "killed" and comm.rank == 3 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if scenario == "interrupt" and comm.rank == 3 and step == 2:
            time.sleep(5)  # silent, but alive: rank 0 waits on the hierarchy's rings
        if scenario == "interrupt" and comm.rank == 0 and step == 2:
            interrupted_at = []
            threading.Timer(1.0, lambda: (interrupted_at.append(time.monotonic()),
                                          os.kill(os.getpid(), signal.SIGINT))).start()
        x[:] = 1
        comm.allreduce(x)
        assert (x == comm.size).all()
    result["ok"] = True
except (cc.CollectiveError, KeyboardInterrupt) as error:
    result.update(error_type=type(error).__name__, message=str(error))
    if isinstance(error, KeyboardInterrupt):
        result["latency"] = time.monotonic() - interrupted_at[0]
print(json.dumps(result), flush=True)
"""


# One piece (the stages one after the other on the caller's thread), and 4 pieces (a thread per
# stage: the caller's thread runs the host's, the top's runs on a thread of its own).
FAULT_COUNTS = [100_000, 1 << 20]


def run_fault(run_ranks, scenario, count):
    return run_ranks(FAULT_SCRIPT, 4, args=[scenario, str(count)], env={**FORCED, "COLLECTIVES_TIMEOUT": "10"},
                     rank_env=lambda r: {"COLLECTIVES_TOPOLOGY": TWO_RACKS[r]}, timeout=60)


@pytest.mark.parametrize("count", FAULT_COUNTS)
def test_killed_rank_fails_the_survivors_naming_it(run_ranks, count):
    start = time.monotonic()
    survivors = [r for r in run_fault(run_ranks, "killed", count) if r.returncode != -signal.SIGKILL]
    assert len(survivors) == 3
    for result in survivors:
        report = result.report()
        assert report.get("error_type") in ("CollectiveError", "TimeoutError"), report
        assert re.search(r"\brank 3\b", report["message"]) and "allreduce #" in report["message"], report
    assert time.monotonic() - start < 10.0 + 30  # seen at once (the timeout is 10 s), not waited out


@pytest.mark.parametrize("count", FAULT_COUNTS)
def test_ctrl_c_inside_the_hierarchy_raises_keyboard_interrupt_promptly(run_ranks, count):
    reports = [result.report() for result in run_fault(run_ranks, "interrupt", count)]
    assert reports[0].get("error_type") == "KeyboardInterrupt" and reports[0]["latency"] < 1.0, reports[0]
    for report in reports[1:]:
        assert report.get("error_type") in ("CollectiveError", "TimeoutError"), report
