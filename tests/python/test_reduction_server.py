"""The reduction server's results, with real worker and reducer processes over real sockets:
every dtype and op against numpy for several numbers of workers and reducers (one job per
pair), and determinism: the same bits for every number of reducers and chunk size, equal to
numpy's left fold over ranks.
"""

import hashlib

import numpy as np
import pytest

import collective_cases as cases_lib

pytestmark = pytest.mark.timeout(300)

# Small chunks, so that the larger counts are cut into many chunks over every reducer.
SMALL_CHUNKS = {"COLLECTIVES_RS_CHUNK_BYTES": "4K", "COLLECTIVES_TIMEOUT": "120"}
COUNTS = [0, 1, 2, 7, 1009, 65537]


def allreduce_cases(size):
    """Every dtype and op at every count, plus the other collectives once (they run among the
    workers, beside the reducers)."""
    cases = cases_lib.matrix(size, COUNTS)
    allreduces = [c for c in cases if c["collective"] == "allreduce"]
    others = {c["collective"]: c for c in cases if c["collective"] != "allreduce"}
    return allreduces + list(others.values())


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("reducers", [1, 2, 3, 5])
def test_matches_numpy(run_ranks, tmp_path, workers, reducers):
    cases_lib.run_job(run_ranks, tmp_path, workers, allreduce_cases(workers), env=SMALL_CHUNKS,
                      reducers=reducers)


# Sums of floats whose exponents span 2^-20..2^20 depend on the order of the additions: equal
# bits mean the same order. Each job sums the same inputs twice and reports the results' hash.
DETERMINISM_SCRIPT = r'''
import hashlib, json
import numpy as np
import collectives as cc

def inputs(size, count):
    rng = np.random.default_rng(2024)
    return [(rng.uniform(-1, 1, count) * 2.0 ** rng.integers(-20, 21, count)).astype(np.float32)
            for _ in range(size)]

with cc.init() as comm:
    mine = inputs(comm.size, 100003)
    digests = []
    for _ in range(2):
        x = mine[comm.rank].copy()
        comm.allreduce(x)
        digests.append(hashlib.sha256(x.tobytes()).hexdigest())
    print(json.dumps({"digests": digests, "algorithm": comm.algorithm}))
'''


def left_fold_digest(order):
    rng = np.random.default_rng(2024)
    inputs = [(rng.uniform(-1, 1, 100003) * 2.0 ** rng.integers(-20, 21, 100003)).astype(np.float32)
              for _ in range(3)]
    total = inputs[order[0]].copy()
    for r in order[1:]:
        total += inputs[r]
    return hashlib.sha256(total.tobytes()).hexdigest()


def test_bits_are_the_same_for_every_reducer_count_and_chunk_size(run_ranks):
    expected = left_fold_digest([0, 1, 2])
    # The control: another order of the same additions gives other bits (x0 + x1 = x1 + x0, but
    # (x0 + x2) + x1 is another sum), so the comparison
    # below would catch a reducer that summed in arrival order.
    assert left_fold_digest([2, 1, 0]) != expected and left_fold_digest([0, 2, 1]) != expected
    for reducers, chunk in [(1, "4K"), (2, "4K"), (3, "4K"), (3, "64K"), (2, "1M")]:
        results = run_ranks(DETERMINISM_SCRIPT, 3, reducers=reducers, timeout=120,
                            env={"COLLECTIVES_RS_CHUNK_BYTES": chunk, "COLLECTIVES_TIMEOUT": "60"})
        for rank, result in enumerate(results[:3]):
            assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-3000:]}"
            report = result.report()
            assert report["algorithm"] == "reduction_server"
            assert report["digests"] == [expected, expected], (
                f"{reducers} reducers, {chunk} chunks: rank {rank} got other bits than numpy's left fold")
