"""The host's shared board (csrc/algorithms/allreduce_board.h) on real processes of one host:
auto takes it for all-reduces, and every rank ends with numpy's left-to-right
sum over the ranks, bit for bit, through one barrier (8 B), two (100 KiB) and several slots
(2.7 MiB); the average and the minimum too. Without shared memory (COLLECTIVES_TRANSPORT=tcp)
or with a forced algorithm there is no board; with reducers, the reducers serve.
A rank that calls differently, dies or stays silent at the board: tests/python/test_failures.py
(its jobs run on one host, so through the board)."""

import pytest

SCRIPT = r'''
import json
import numpy as np
import collectives as cc

comm = cc.init()
rank, size = comm.rank, comm.size

def data(n, r):
    """Exponents far apart: the sum depends on its order."""
    g = np.random.default_rng(n * 10 + r)
    return (g.standard_normal(n) * np.exp2(g.integers(-20, 20, n))).astype(np.float32)

report = {"rank": rank}
for n in (2, 25_000, 700_001):
    for op in ("sum", "avg", "min"):
        x = data(n, rank)
        comm.allreduce(x, op=op)
        rows = [data(n, r) for r in range(size)]
        if op == "min":
            expected = np.minimum.reduce(rows)
        else:
            expected = rows[0]
            for row in rows[1:]:
                expected = expected + row  # float32, left to right over the ranks
            if op == "avg":
                expected = expected / np.float32(size)
        report[f"{op} {n}"] = bool(np.array_equal(x, expected))
print(json.dumps(report))
comm.close()
'''


def _boards(result) -> int:
    return result.stderr.count("start (board)")


def test_auto_takes_the_board_on_one_host_and_sums_in_rank_order(run_ranks):
    results = run_ranks(SCRIPT, 4, env={"COLLECTIVES_DEBUG": "1"}, timeout=120)
    for result in results:
        report = result.report()
        assert all(report[key] for key in report if key != "rank"), report
        assert _boards(result) == 9, result.stderr[-2000:]


@pytest.mark.parametrize("env", [{"COLLECTIVES_TRANSPORT": "tcp"}, {"COLLECTIVES_ALGORITHM": "ring"}])
def test_no_board_without_shared_memory_or_with_a_forced_algorithm(run_ranks, env):
    results = run_ranks(SCRIPT, 3, env={"COLLECTIVES_DEBUG": "1", **env}, timeout=120)
    for result in results:
        report = result.report()
        assert report["min 2"] and report["min 700001"], report  # exact whatever the order
        assert _boards(result) == 0, result.stderr[-2000:]


def test_reducers_serve_where_there_are_some(run_ranks):
    results = run_ranks(SCRIPT, 2, env={"COLLECTIVES_DEBUG": "1"}, reducers=1, timeout=120)
    for result in results[:2]:
        report = result.report()
        assert all(report[key] for key in report if key != "rank"), report  # the reducers sum in rank order too
        assert _boards(result) == 0, result.stderr[-2000:]


CLOSES_SCRIPT = r'''
import json, time
import numpy as np
import collectives as cc

comm = cc.init()
x = np.ones(49, np.float32)
for _ in range(2):
    comm.allreduce(x)
if comm.rank == 1:
    comm.close()  # the others' next all-reduce waits for it at the board
else:
    start = time.monotonic()
    try:
        comm.allreduce(x)
        error = None
    except cc.CollectiveError as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"error": error, "seconds": time.monotonic() - start}))
'''


def test_a_rank_that_closes_fails_the_others_at_once_not_at_their_deadline(run_ranks):
    results = run_ranks(CLOSES_SCRIPT, 3, env={"COLLECTIVES_TIMEOUT": "60"}, timeout=60)
    for rank in (0, 2):
        report = results[rank].report()
        assert report["error"] and "rank 1" in report["error"] and "closed its communicator" in report["error"], report
        assert report["seconds"] < 10, report
