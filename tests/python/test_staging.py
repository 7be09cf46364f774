"""The staged all-reduce of device buffers (csrc/staging/, issue 16) from Python, through the
host-memory copy engine: the schedule that CUDA buffers take on a GPU (whose copy engine is not
run here: tests/gpu/check_cuda.py runs it where there is one). Real processes, the ring and the
reduction server: several calls in flight beside plain all-reduces, each equal to numpy's sum;
an async call returns before its copies are done; close() frees the slots after the calls end."""

import pytest

SCRIPT = r"""
import json
import numpy as np
import collectives as cc
from collectives import _core

comm = cc.init(timeout=60)
rank, size = comm.rank, comm.size
core = comm._live_core()  # the staging pipeline queues its pieces on the core's communicator
staging = _core.StagedAllreduce.host(piece_bytes=4096, slots=3)
float32, total = _core.DTYPES.index("float32"), _core.OPS.index("sum")
counts = [0, 1, 1023, 1025, 300007]
staged = [np.arange(n, dtype=np.float32) % 11 + rank for n in counts]
plain = [x.copy() for x in staged]
works, plain_works = [], []
for x, y in zip(staged, plain):
    works.append(staging.allreduce(core, x.ctypes.data, x.size, float32, total))
    plain_works.append(comm.allreduce_async(y))
pending_at_return = not works[-1].done()  # 293 pieces through 3 slots: not done yet
for work in works:
    while not work.wait_for(1.0):
        pass
for work in plain_works:
    work.wait()
expected = [sum(np.arange(n, dtype=np.float32) % 11 + r for r in range(size)) if n else np.zeros(0, np.float32)
            for n in counts]
comm.close()
staging.close()
print(json.dumps({"equal": [bool(np.array_equal(x, e)) and bool(np.array_equal(x, y))
                            for x, y, e in zip(staged, plain, expected)],
                  "pending_at_return": pending_at_return}))
"""


@pytest.mark.parametrize("reducers", [0, 2])
def test_staged_allreduce_through_host_memory(run_ranks, reducers):
    env = {"COLLECTIVES_ALGORITHM": "reduction_server" if reducers else "ring"}
    results = run_ranks(SCRIPT, 2, reducers=reducers, env=env, timeout=90)
    for result in results[:2]:
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        assert all(report["equal"]) and report["pending_at_return"], report
