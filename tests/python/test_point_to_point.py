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
start = time.monotonic()
error = None
# Init is inside: a rank still finishing the start-up's last exchange when the others, done with it,
# find the bad call hears of it there (more often over UCX, whose start-up has one more round).
try:
    with cc.init(timeout=60) as comm:
        r, n = comm.rank, comm.size
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


ANY_SOURCE_SCRIPT = """
import json, sys
import numpy as np
import collectives as cc

ROUNDS, COUNT = 6, 70001  # 280 KB a message: over shared memory, copied from the sender's memory


def payload(sender, round_):  # random bits, NaNs included: compared bit for bit
    return np.random.default_rng([sender + 10, round_]).integers(0, 2**32, COUNT, dtype=np.uint32).view(np.float32)


with cc.init(timeout=60) as comm:
    r, n = comm.rank, comm.size
    report = {}
    if r == 0:
        # Every receive is posted before any is waited on: the senders race for them.
        anys = [comm.recv_async(np.zeros(COUNT, np.float32), cc.ANY_SOURCE, tag=5) for _ in range((n - 1) * ROUNDS)]
        own = [comm.recv_async(np.zeros(COUNT, np.float32), 1, tag=6) for _ in range(ROUNDS)]
        rounds = {s: 0 for s in range(1, n)}
        wrong = []
        for w in anys:
            x = w.wait()
            s = w.source
            if not (1 <= s < n and np.array_equal(x.view(np.uint32), payload(s, rounds[s]).view(np.uint32))):
                wrong.append((s, rounds.get(s)))
            rounds[s] = rounds.get(s, 0) + 1
        for k, w in enumerate(own):
            if not np.array_equal(w.wait().view(np.uint32), payload(-1, k).view(np.uint32)):
                wrong.append(("tag 6", k))
        # Rank 2 sent a tag-7 message before all of its tag-5 ones: no receive from any source took it.
        late = np.zeros(COUNT, np.float32)
        if comm.recv(late, 2, tag=7) != 2 or not np.array_equal(late.view(np.uint32), payload(-2, 0).view(np.uint32)):
            wrong.append(("tag 7", 0))
        # The blocking form returns the sender.
        one = np.zeros(1, np.int64)
        senders = sorted(comm.recv(one, tag=8) for _ in range(n - 1))
        report = {"wrong": wrong, "rounds": rounds, "senders": senders}
    else:
        if r == 2:  # not waited on yet: over UCX a large message's send ends once its receive is posted
            late = payload(-2, 0)
            late_send = comm.send_async(late, 0, tag=7)
        for k in range(ROUNDS):
            comm.send(payload(r, k), 0, tag=5)
            if r == 1:
                comm.send(payload(-1, k), 0, tag=6)
        comm.send(np.full(1, r, np.int64), 0, tag=8)
        if r == 2:
            late_send.wait()
    # In a subgroup ordered backwards (ranks 2, 0 and 3, 1): the source is a rank of the subgroup.
    sub = comm.split(r % 2, key=-r)
    if r < 2:
        got = np.zeros(5, np.int64)
        report["subgroup"] = [sub.recv(got, cc.ANY_SOURCE, tag=1), got.tolist()]
    else:
        sub.send(np.arange(5, dtype=np.int64) * r, 1, tag=1)
    comm.barrier()
    print(json.dumps(report))
"""


@pytest.mark.parametrize("transport", [*TRANSPORTS, "auto"])
def test_receive_from_any_source(run_ranks, transport):
    """Senders race for receives from any source (as MPI_ANY_SOURCE, torch's recv without src):
    each message lands once, bit for bit, each sender's in the order sent, its sender said;
    messages of other tags and per-peer receives are left alone."""
    results = run_ranks(ANY_SOURCE_SCRIPT, 4, env=transport_env(transport), timeout=120)
    for rank, result in enumerate(results):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    report = results[0].report()
    assert report["wrong"] == [], report
    assert report["rounds"] == {str(s): 6 for s in range(1, 4)}, report
    assert report["senders"] == [1, 2, 3], report
    assert report["subgroup"] == [0, [0, 2, 4, 6, 8]], report
    assert results[1].report()["subgroup"] == [0, [0, 3, 6, 9, 12]], results[1].report()


PENDING_ANY_SOURCE_SCRIPT = """
import json, sys, threading, time
import numpy as np
import collectives as cc

how = sys.argv[1]
with cc.init(timeout=60) as comm:
    start = time.monotonic()
    error = None
    try:
        if comm.rank == 0:
            w = comm.recv_async(np.zeros(1000, np.float32), cc.ANY_SOURCE, tag=3)
            if how == "abort":
                threading.Timer(0.5, comm.abort).start()
            w.wait()
        elif how == "abort":
            comm.recv(np.zeros(1), 0, tag=9)  # never sent: the abort ends it
    except cc.CollectiveError as e:
        error = str(e)
    print(json.dumps({"error": error, "seconds": time.monotonic() - start}))
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("how,words", [("abort", "abort"), ("closed", "has closed")])
def test_a_pending_receive_from_any_source_ends(run_ranks, transport, how, words):
    """Aborted by its own rank, or every rank it could take a message from closed: it fails at
    once, never waiting for the timeout."""
    results = run_ranks(PENDING_ANY_SOURCE_SCRIPT, 3, args=[how], env=transport_env(transport), timeout=60)
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        if how == "closed" and rank > 0:
            continue
        assert report["error"] and words in report["error"], (rank, report)
        assert report["seconds"] < 15, (rank, report)


C_API_SCRIPT = """
import ctypes, gc, json, time
import numpy as np
import collectives as cc
from collectives import c_api

DONE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)
ALLREDUCE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, DONE, ctypes.c_void_p)
# collectives_c_api: uint32 version, then the function pointers (allreduce first)
version = ctypes.c_uint32.from_address(c_api.table_address()).value
allreduce = ALLREDUCE(ctypes.c_void_p.from_address(c_api.table_address() + ctypes.sizeof(ctypes.c_void_p)).value)

def through_the_c_api(handle, data, dtype=2, op=0):  # float32, sum
    ended = []
    done = DONE(lambda context, status, message: ended.append((status, message and message.decode())))
    allreduce(handle, data.ctypes.data, data.size, dtype, op, 1, done, None)  # blocking
    deadline = time.monotonic() + 20  # done may come from the communicator's thread
    while not ended and time.monotonic() < deadline:
        time.sleep(0.001)
    return ended[0]

comm = cc.init(timeout=30)
handle, rank = comm.c_handle, comm.rank
# An average of integers, refused by the core's one check whichever entry asks (nothing is sent:
# the all-reduce below still sums right).
ints = np.ones(2 * comm.size, np.int32)
avg_of_ints = {"c_api": through_the_c_api(handle, ints, 6, 1)}  # int32, avg
for name, call in (("allreduce", lambda: comm.allreduce(ints, op="avg")),
                   ("reduce_scatter", lambda: comm.reduce_scatter(ints, op="avg")),
                   ("reduce", lambda: comm.reduce(ints, root=0, op="avg"))):
    try:
        call()
        avg_of_ints[name] = "nothing"
    except ValueError as error:
        avg_of_ints[name] = str(error)
data = np.full(1000, rank + 1, np.float32)
open_status = through_the_c_api(handle, data)
total = float(data[0])
comm.close()
del comm
gc.collect()
# What the heap gives out next overwrites anything freed (a freed communicator would be garbage).
filler = [bytes([255]) * size for size in range(64, 8192, 16) for _ in range(8)]
closed_status = through_the_c_api(handle, np.ones(10, np.float32))
print(json.dumps({"version": version, "open": open_status, "total": total, "closed": closed_status,
                  "avg_of_ints": avg_of_ints}))
"""


def test_the_c_api_reduces_and_a_handle_outliving_its_communicator_is_refused(run_ranks):
    """collectives' C API (what collectives.tf's ops call) from ctypes: an all-reduce through a
    communicator's c_handle (an average of integers refused there as from Python, alike), and the same handle after the communicator was closed and dropped
    (a tf.function traced before ctf.shutdown()): a clear error, never freed memory."""
    for result in run_ranks(C_API_SCRIPT, 2, timeout=60):
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        assert report["version"] == 1 and report["open"] == [0, None] and report["total"] == 3.0, report
        status, message = report["closed"]
        assert status == 1 and "closed" in message, report
        refused = "op 'avg' needs a floating dtype, not int32: use 'sum' and divide"
        assert report["avg_of_ints"] == {"c_api": [3, refused], "allreduce": refused, "reduce_scatter": refused,
                                         "reduce": refused}, report  # 3: COLLECTIVES_INVALID_ARGUMENT
