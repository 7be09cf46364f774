"""Point-to-point messages and the rooted collectives (issue 13): reduce, gather, scatter,
alltoall (even and uneven splits) and tagged send/recv against numpy, bit for bit, on real
processes; and bad calls (another root, sizes that disagree) failing on every rank at once,
never hanging."""

import json

import pytest

import collective_cases as cases_lib
from launch_env import TRANSPORTS, transport_env

COUNTS = [0, 1, 2, 7, 1009, 65537, 300007]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_rooted_and_point_to_point(run_ranks, tmp_path, size):
    cases_lib.run_job(run_ranks, tmp_path, size, cases_lib.rooted_matrix(size, COUNTS))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_on_each_transport(run_ranks, tmp_path, transport):
    cases_lib.run_job(run_ranks, tmp_path, 3, cases_lib.rooted_matrix(3, [0, 1, 4099, 300007]),
                      env=transport_env(transport))


BAD_CALL_SCRIPT = """
import json, sys, time
import numpy as np
import collectives as cc

case = sys.argv[1]
with cc.init(timeout=60) as comm:
    r, n = comm.rank, comm.size
    start = time.monotonic()
    error = None
    try:
        if case == "root":  # rank 0 thinks the root is 0, the others 1
            comm.gather(np.ones(5, np.float32), root=0 if r == 0 else 1)
        elif case == "reduce_count":
            comm.reduce(np.ones(5 + (r == 2), np.float32), root=0)
        elif case == "scatter_dtype":
            comm.scatter(np.ones((n, 4), np.float32 if r else np.int32), root=0)
        elif case == "alltoall_splits":  # rank 1 expects one row more from rank 0 than rank 0 sends
            recv = [1] * n
            if r == 1:
                recv[0] = 2
            comm.alltoall(np.ones((n, 2), np.int64), send_splits=[1] * n, recv_splits=recv)
        elif case == "recv_count":  # rank 1 expects 12 elements, rank 0 sends 10; rank 2 waits in a barrier
            if r == 0:
                comm.send(np.ones(10, np.float32), 1)
            elif r == 1:
                comm.recv(np.ones(12, np.float32), 0)
            comm.barrier()
        comm.barrier()
    except cc.CollectiveError as e:
        error = str(e)
    print(json.dumps({"error": error, "seconds": time.monotonic() - start}))
"""


@pytest.mark.parametrize("case,words", [
    ("root", "root"),
    ("reduce_count", "x float32"),
    ("scatter_dtype", "int32"),
    ("alltoall_splits", "alltoall"),
    ("recv_count", "send/recv"),
])
def test_bad_calls_fail_on_every_rank(run_ranks, case, words):
    results = run_ranks(BAD_CALL_SCRIPT, 3, args=[case], timeout=60)
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        assert report["error"], f"rank {rank} saw no error"
        assert report["seconds"] < 20, f"rank {rank} heard of it only after {report['seconds']:.1f} s"
        assert words in report["error"], report["error"]


def test_bad_arguments_are_refused_before_anything_is_sent(run_ranks):
    script = """
import json
import numpy as np
import collectives as cc
with cc.init() as comm:
    out = {}
    for name, call in {
        "root": lambda: comm.reduce(np.ones(3), root=comm.size),
        "self": lambda: comm.send(np.ones(3), comm.rank),
        "tag": lambda: comm.send(np.ones(3), (comm.rank + 1) % comm.size, tag=-1),
        "splits": lambda: comm.alltoall(np.ones((4, 2)), send_splits=[1, 1], recv_splits=[2, 2]),
        "uneven": lambda: comm.alltoall(np.ones((3, 2))),
        "scatter": lambda: comm.scatter(None, root=0),
    }.items():
        try:
            call()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    comm.barrier()  # nothing was sent: the communicator is fine
    print(json.dumps(out))
"""
    for result in run_ranks(script, 2, timeout=60):
        assert result.returncode == 0, result.stderr[-3000:]
        assert all(result.report().values()), result.report()
