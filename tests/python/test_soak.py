"""A soak: thousands of collectives on real processes, every result checked, with the memory
(RSS) and the open file descriptors of every worker and reducer sampled as it goes: both must
stay flat once warm: 2,000 collectives, or 20,000 with COLLECTIVES_TEST_FULL=1 (the test
command's long run)."""

import os
import time

import pytest

COLLECTIVES = 20000 if os.environ.get("COLLECTIVES_TEST_FULL") == "1" else 2000
# What RSS may grow by between the first sample after the warm-up and the last: allocator
# noise, far below what one leaked buffer per collective would add (2,000 x 16 KiB = 31 MiB).
RSS_SLACK_KIB = 6 << 10

SOAK_SCRIPT = r'''
import json, os, sys, time
from pathlib import Path
import numpy as np
import collectives as cc

def checkpoint(name):
    """Rank 0 tells the test that the job is at `name`, and waits (10 s at most) until the
    test has sampled the reducers there."""
    folder = Path(sys.argv[2])
    (folder / name).touch()
    deadline = time.monotonic() + 10
    while not (folder / (name + ".sampled")).exists() and time.monotonic() < deadline:
        time.sleep(0.01)

def usage():
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir("/proc/self/fd"))

total, warm = int(sys.argv[1]), int(sys.argv[1]) // 10
samples, wrong = [], 0
with cc.init() as comm:
    for i in range(total):
        count = (1, 1000, 4096)[i % 3]
        x = np.full(count, comm.rank + 1 + i % 7, np.float32)
        if i % 5 == 4:
            comm.allreduce_async(x).wait()
        else:
            comm.allreduce(x)
        wrong += int(np.count_nonzero(x != sum(r + 1 + i % 7 for r in range(comm.size))))
        if i % 10 == 0:  # the workers' other collectives too
            gathered = comm.allgather(np.full(4, comm.rank, np.int32))
            wrong += int(np.count_nonzero(gathered[:, 0] != np.arange(comm.size)))
        if i >= warm and i % warm == 0:
            samples.append(usage())
        if i == warm and comm.rank == 0:
            checkpoint("warm")
    samples.append(usage())
    if comm.rank == 0:
        checkpoint("end")
    print(json.dumps({"wrong": wrong, "samples": samples, "algorithm": comm.algorithm}))
'''


def _usage_of(pid):
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _check_flat(label, samples):
    (rss_first, fds_first), (rss_last, fds_last) = samples[0], samples[-1]
    assert fds_last <= fds_first, f"{label}: open fds grew from {fds_first} to {fds_last}"
    assert rss_last - rss_first < RSS_SLACK_KIB, f"{label}: RSS grew by {rss_last - rss_first} KiB: {samples}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("reducers", [0, 2], ids=["ring", "reduction-server"])
def test_thousands_of_collectives_keep_memory_and_fds_flat(run_ranks, tmp_path, reducers):
    reducer_samples = {}

    def sample_reducers(processes):
        """The reducers' usage at rank 0's two checkpoints: once warm, and at the end."""
        reducer_procs = {label: proc for label, proc in processes.items() if label.startswith("reducer")}
        for checkpoint in ("warm", "end"):
            deadline = time.monotonic() + 500
            while not (tmp_path / checkpoint).exists():
                if time.monotonic() > deadline or any(proc.poll() is not None for proc in processes.values()):
                    return
                time.sleep(0.01)
            for label, proc in reducer_procs.items():
                reducer_samples.setdefault(label, []).append(_usage_of(proc.pid))
            (tmp_path / f"{checkpoint}.sampled").touch()

    results = run_ranks(SOAK_SCRIPT, 3, args=[str(COLLECTIVES), str(tmp_path)], reducers=reducers, timeout=540,
                        during=sample_reducers)
    for rank, result in enumerate(results[:3]):
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        assert report["wrong"] == 0
        assert report["algorithm"] == ("reduction_server" if reducers else "auto")
        _check_flat(f"rank {rank}", report["samples"])
    assert len(reducer_samples) == reducers
    for label, samples in reducer_samples.items():
        assert len(samples) == 2, f"{label}: sampled {samples}"
        _check_flat(label, samples)
