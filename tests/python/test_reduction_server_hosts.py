"""The reduction server's host plan (issue 12) with real worker and reducer processes: several
ranks per host (per-rank COLLECTIVES_TOPOLOGY labels make them different hosts; the ranks of one
label reduce-scatter and all-gather among themselves), each local rank exchanging only its share
with the reducers. Every dtype and op against numpy on exact data; order-sensitive float32,
float16 and bfloat16 sums and averages against numpy computing the plan's order (the host's ring,
then the hosts folded left at the reducer, half types in float32 rounded once), bit for bit, for
1-3 reducers and several chunk sizes (the same bits for all); a reducer killed mid-sequence; a
worker killed mid-sequence, which fails every other worker, naming it; uneven hosts, which fall
back to the flat plan and say so; and the flat plan where COLLECTIVES_RS_PLAN=flat asks for it.
CI runs 2 reducers against numpy and, for the bits, two settings on the interleaved layout (2
hosts of 3); COLLECTIVES_TEST_FULL=1 runs 1-3 reducers, and three settings on both layouts.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

import collective_cases as cases_lib

pytestmark = pytest.mark.timeout(300)
FULL = os.environ.get("COLLECTIVES_TEST_FULL") == "1"

# The plan's order, computed in numpy by the rank processes (hierarchical_cases: the host's ring
# over the hierarchical plan's pieces).
RANK_SCRIPT = r'''
import hashlib, json, os, sys, threading
sys.path.insert(0, os.environ["TEST_CASES_DIR"])
import numpy as np
import collective_cases, hierarchical_cases
import collectives as cc
from collectives.reduction_server.host_plan import host_plan

def spread(seed, rank, count, dtype):
    rng = np.random.default_rng([seed, rank])
    values = np.ldexp(rng.uniform(-1, 1, count), rng.integers(-20, 21, count)).astype(np.float32)
    return values.astype(collective_cases.numpy_dtype(dtype))

def host_plan_result(inputs, hosts, op):
    """Each host's sum in its ring's order, piece by piece, then the hosts folded left (half types
    in float32, rounded once), avg divided once by the number of workers."""
    dtype, count = inputs[0].dtype, len(inputs[0])
    offsets = hierarchical_cases.pieces(count, dtype.itemsize)
    sums = []
    for host in hosts:
        total = np.empty(count, dtype)
        for lo, hi in zip(offsets, offsets[1:]):
            blocks = hierarchical_cases.even_blocks(hi - lo, len(host))
            for b in range(len(host)):
                part = slice(lo + blocks[b], lo + blocks[b + 1])
                total[part] = hierarchical_cases.ring_block([inputs[m][part] for m in host], b)
        sums.append(total)
    compute = np.float32 if dtype.itemsize == 2 else dtype.type
    acc = sums[0].astype(compute)
    for s in sums[1:]:
        acc = acc + s.astype(compute)
    if op == "avg":
        acc = acc / compute(len(inputs))
    return acc.astype(dtype)

cases = json.loads(open(sys.argv[1]).read())
with cc.init() as comm:
    hosts = host_plan(comm.topology).hosts
    problems, digests = [], []
    for case in cases:
        if case["collective"] != "order":
            problems += collective_cases.run_case(comm, case)
            continue
        x = spread(case["seed"], comm.rank, case["count"], case["dtype"])
        comm.allreduce(x, op=case["op"])
        want = host_plan_result([spread(case["seed"], r, case["count"], case["dtype"]) for r in range(comm.size)],
                                hosts, case["op"])
        problems += collective_cases.check_equal(f"rank {comm.rank}: order, {collective_cases.describe(case)}", x, want)
        digests.append(hashlib.sha256(x.tobytes()).hexdigest())
    if os.environ.get("TEST_STOP_FILE"):  # all-reduces, each checked, until rank 0 sees the file
        steps, stop = 0, np.zeros(1, np.int32)
        open(os.path.join(os.environ["TEST_RUNNING_DIR"], str(comm.rank)), "w").close()
        while True:
            stop[0] = os.path.exists(os.environ["TEST_STOP_FILE"])
            if comm.broadcast(stop, root=0)[0]:
                break
            if steps == 3 and os.environ.get("TEST_DIE_RANK") == str(comm.rank):  # inside the next all-reduce
                threading.Timer(0.02, os.kill, (os.getpid(), 9)).start()
            inputs = [spread(1000 + steps, r, 300_001, "float32") for r in range(comm.size)]
            x = inputs[comm.rank].copy()
            comm.allreduce(x)
            problems += collective_cases.check_equal(f"rank {comm.rank}: step {steps}", x,
                                                     host_plan_result(inputs, hosts, "sum"))
            steps += 1
        digests.append(steps)
    print(json.dumps({"rank": comm.rank, "algorithm": comm.algorithm, "hosts": hosts, "problems": problems[:20],
                      "digests": digests, "reducers": comm.reducer_stats()}))
'''

# Counts over one piece and over several (3 pieces of float32, 2 of float16).
ORDER_COUNTS = (1, 13, 65537, 786_433)


def order_cases():
    cases, seed = [], 100
    for dtype in ("float32", "float16", "bfloat16"):
        for op in ("sum", "avg"):
            for count in ORDER_COUNTS:
                seed += 1
                cases.append(dict(collective="order", dtype=dtype, op=op, count=count, seed=seed))
    return cases


def exact_cases(size):
    """Every dtype and op on exact data (any order gives numpy's bits), and the other
    collectives once, for `size` ranks."""
    cases = cases_lib.matrix(size, [0, 1, 7, 1009, 65537])
    allreduces = [c for c in cases if c["collective"] == "allreduce"]
    others = {c["collective"]: c for c in cases if c["collective"] != "allreduce"}
    return allreduces + list(others.values())


def run_hosts(run_ranks, tmp_path, labels, cases, reducers, env=None, timeout=200, during=None):
    """One job of len(labels) workers, rank r labelled labels[r], and `reducers` reducers; each
    worker's report (failing the test on any problem)."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    results = run_ranks(RANK_SCRIPT, len(labels), args=[str(path)], reducers=reducers, timeout=timeout,
                        during=during, rank_env=lambda r: {"COLLECTIVES_TOPOLOGY": labels[r]},
                        env={"TEST_CASES_DIR": str(Path(__file__).resolve().parent), "COLLECTIVES_TIMEOUT": "90",
                             **(env or {})})
    reports = []
    for rank, result in enumerate(results[:len(labels)]):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"
        report = result.report()
        assert report["problems"] == [], "\n".join(report["problems"])
        reports.append((report, result.stderr))
    return reports, results[len(labels):]


def labels_of(hosts, per_host):
    return [f"host{h}" for h in range(hosts) for _ in range(per_host)]


@pytest.mark.parametrize("reducers", [pytest.param(r, marks=pytest.mark.skipif(
    not FULL and r != 2, reason="CI runs 2 reducers: runs with COLLECTIVES_TEST_FULL=1")) for r in (1, 2, 3)])
def test_two_hosts_of_two_match_numpy(run_ranks, tmp_path, reducers):
    reports, _ = run_hosts(run_ranks, tmp_path, labels_of(2, 2), exact_cases(4) + order_cases(), reducers,
                           env={"COLLECTIVES_RS_CHUNK_BYTES": "4K"})
    for report, _ in reports:
        assert report["algorithm"] == "reduction_server:host"
        assert report["hosts"] == [[0, 1], [2, 3]]


def test_the_same_bits_for_every_reducer_count_and_chunk_size(run_ranks, tmp_path):
    """3 hosts of 2 and 2 hosts of 3 (a ring order that matters), interleaved ranks."""
    layouts = [["host0", "host1", "host0", "host1", "host0", "host1"], labels_of(3, 2)][:None if FULL else 1]
    for labels in layouts:
        seen = None
        for reducers, chunk in [(1, "4K"), (3, "64K"), (2, "0")][:None if FULL else 2]:
            reports, _ = run_hosts(run_ranks, tmp_path, labels, order_cases(), reducers,
                                   env={"COLLECTIVES_RS_CHUNK_BYTES": chunk} if chunk != "0" else None)
            digests = {tuple(report["digests"]) for report, _ in reports}
            assert len(digests) == 1, "the workers ended with different bits"
            assert seen in (None, digests), f"{reducers} reducers, chunks {chunk}: other bits"
            seen = digests


def test_a_reducer_killed_mid_sequence_loses_nothing(run_ranks, tmp_path):
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()

    def kill_reducer_1(procs):
        deadline = time.monotonic() + 60
        while len(list(running.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        procs["reducer 1"].kill()
        time.sleep(1.5)  # all-reduces without it
        stop.touch()

    reports, reducers = run_hosts(run_ranks, tmp_path, labels_of(2, 2), [], 3, during=kill_reducer_1,
                                  env={"TEST_STOP_FILE": str(stop), "TEST_RUNNING_DIR": str(running),
                                       "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "5"})
    dead = {tuple(i for i, s in enumerate(report["reducers"]) if not s["alive"]) for report, _ in reports}
    assert len(dead) == 1 and len(next(iter(dead))) == 1, dead  # the killed one (its index: its join order)
    for report, stderr in reports:
        assert report["algorithm"] == "reduction_server:host"
        assert report["digests"][-1] > 2, report  # all-reduces, each checked, before and after
        assert "go to the other reducers" in stderr or "stops using it too" in stderr, stderr[-3000:]
    assert reducers[1].returncode == -signal.SIGKILL
    assert reducers[0].returncode == 0 and reducers[2].returncode == 0


def test_a_worker_killed_mid_sequence_fails_every_other_naming_it(run_ranks, tmp_path):
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()
    (tmp_path / "cases.json").write_text("[]")
    started = time.monotonic()
    results = run_ranks(RANK_SCRIPT, 4, args=[str(tmp_path / "cases.json")], reducers=2, timeout=120,
                        rank_env=lambda r: {"COLLECTIVES_TOPOLOGY": f"host{r // 2}"},
                        env={"TEST_CASES_DIR": str(Path(__file__).resolve().parent), "COLLECTIVES_TIMEOUT": "60",
                             "TEST_STOP_FILE": str(stop), "TEST_RUNNING_DIR": str(running), "TEST_DIE_RANK": "1"})
    assert time.monotonic() - started < 100  # well within the collective's timeout: no rank hung
    assert results[1].returncode == -signal.SIGKILL
    for rank in (0, 2, 3):
        assert results[rank].returncode != 0, results[rank].stdout
        assert "CollectiveError" in results[rank].stderr and "rank 1" in results[rank].stderr, results[rank].stderr[-3000:]


def test_the_flat_plan_where_asked_for(run_ranks, tmp_path):
    reports, _ = run_hosts(run_ranks, tmp_path, labels_of(2, 2),
                           [c for c in exact_cases(4) if c["dtype"] in ("float16", "int32")], 2,
                           env={"COLLECTIVES_RS_PLAN": "flat"})
    assert all(report["algorithm"] == "reduction_server" for report, _ in reports)


def test_uneven_hosts_run_the_flat_plan_and_say_so(run_ranks, tmp_path):
    reports, _ = run_hosts(run_ranks, tmp_path, ["host0", "host0", "host0", "host1", "host1"],
                           [c for c in exact_cases(5) if c["dtype"] in ("float32", "int64")], 2)
    for report, _ in reports:
        assert report["algorithm"] == "reduction_server"
        assert report["hosts"] is None
    assert "the hosts hold 2-3 ranks" in reports[0][1] and "the flat plan runs" in reports[0][1], reports[0][1][-3000:]
