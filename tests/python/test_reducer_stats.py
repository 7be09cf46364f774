"""The reducer's --stats-json: its CPU use while it works, not only over its life.

A reducer waits for most of its life (the job's start-up, the workers' other work between
all-reduces: in compare.py's runs, every gloo and MPI round), so its CPU use averaged over
its life read "0% of a core" after moving hundreds of MB. The totals also give it over the
time it was at work (busy_s, busy_cpu_s, busy_cpu_percent)."""

import json

import pytest

pytestmark = pytest.mark.timeout(180)

# 64 MiB of float32 all-reduced 5 times, then idle for 4 s before closing: the reducer's life
# is mostly idle.
BUSY_THEN_IDLE = r"""
import time
import numpy as np
import collectives as cc
with cc.init() as comm:
    x = np.ones(16 << 20, np.float32)
    for _ in range(5):
        comm.allreduce(x)
    assert x[0] == comm.size ** 5, x[0]
    time.sleep(4)
print("done")
"""


def test_reducer_reports_its_cpu_use_while_busy_apart_from_its_life(run_ranks, tmp_path):
    results = run_ranks(BUSY_THEN_IDLE, 2, reducers=1, timeout=150,
                        reducer_args=lambda index: ["--stats-json", tmp_path / f"reducer-{index}.json"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    totals = json.loads((tmp_path / "reducer-0.json").read_text())["totals"]
    assert totals["bytes_received"] >= 2 * 5 * (64 << 20), totals
    # At work for a fraction of its life, the CPU it used then and in all ...
    assert 0 < totals["busy_s"] < totals["elapsed_s"] - 3, totals
    assert 0 < totals["busy_cpu_s"] <= totals["cpu_s"] + 0.05, totals
    # ... so per second of work it used a good deal more than over its life (over 2x here: at
    # least 4 of its seconds were idle).
    assert totals["busy_cpu_percent"] == pytest.approx(100 * totals["busy_cpu_s"] / totals["busy_s"], rel=0.02)
    assert totals["busy_cpu_percent"] > 2 * totals["cpu_percent"] > 0, totals
    assert "while busy" in results[-1].stderr, results[-1].stderr[-2000:]
