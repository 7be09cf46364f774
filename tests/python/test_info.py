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
