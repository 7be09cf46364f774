"""collectives-info and COLLECTIVES_DEBUG: what a user diagnosing a job sees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import collectives

INFO = Path(sys.executable).parent / "collectives-info"


def test_info_reports_version_build_and_effective_settings():
    env = {**os.environ, "COLLECTIVES_RING_SEGMENT_BYTES": "512K"}
    out = subprocess.run([str(INFO), "--json"], env=env, capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(out.stdout)
    assert info["version"] == collectives.__version__
    assert info["protocol_version"] == collectives.PROTOCOL_VERSION
    assert info["build"]["simd_level"] in info["build"]["simd_levels_supported"]
    assert info["settings"]["COLLECTIVES_RING_SEGMENT_BYTES"] == 512 << 10


def test_info_shows_where_auto_turns_from_recursive_doubling_to_the_ring():
    out = subprocess.run([str(INFO), "--json"], capture_output=True, text=True, timeout=60, check=True)
    auto = json.loads(out.stdout)["auto"]
    alpha, beta = auto["cost_model"]["alpha_seconds"], auto["cost_model"]["beta_seconds_per_byte"]
    # select.cc's model, solved by hand: the ring's 2(n-1) messages of S/n against recursive
    # doubling's log2(n) messages of S cross where 2(n-1)a + 2(n-1)/n S b = log2(n)(a + S b).
    for n, rounds in ((4, 2), (8, 3), (16, 4), (64, 6)):
        crossing = (2 * (n - 1) - rounds) * alpha / ((rounds - 2 * (n - 1) / n) * beta)
        assert abs(auto["ring_from_bytes"][str(n)] - crossing) <= 1, (n, auto)
    assert auto["ring_from_bytes"]["2"] is None  # one exchange of S beats two of S/2 at any size
    text = subprocess.run([str(INFO)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "4 ranks: recursive doubling below 200000 bytes, the ring from there" in text


def test_info_names_a_malformed_setting():
    env = {**os.environ, "COLLECTIVES_TIMEOUT": "soon"}
    out = subprocess.run([str(INFO)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "COLLECTIVES_TIMEOUT" in out.stderr


DEBUG_SCRIPT = """
import numpy as np
import collectives as cc
with cc.init() as comm:
    comm.allreduce(np.ones(1000, np.float32))
"""


def test_debug_logs_each_collective_per_rank(run_ranks):
    for rank, result in enumerate(run_ranks(DEBUG_SCRIPT, 2, env={"COLLECTIVES_DEBUG": "1"}, timeout=60)):
        assert result.returncode == 0, result.stderr
        assert f"[collectives rank {rank}] allreduce #0 (sum, 1000 x float32): start" in result.stderr
        assert f"[collectives rank {rank}] allreduce #0 (sum, 1000 x float32): done" in result.stderr
