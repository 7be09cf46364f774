"""Failures reach every rank as the documented exception, naming the collective and the peer.

Ranks are independent processes (no launcher kills the survivors for us). Each scenario is
paired with the same job without the fault and the same timeout, which must complete.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from launch_env import TRANSPORTS, transport_env

SCENARIO_SCRIPT = r"""
import json, os, signal, sys, threading, time
import numpy as np
import collectives as cc

scenario = sys.argv[1]
parent = os.getpid()
rank = int(os.environ["COLLECTIVES_RANK"])
if scenario == "protocol" and rank == 1:
    import collectives._handshake as handshake
    handshake.PROTOCOL_VERSION += 1  # this process really speaks another version
result = {"rank": rank}
interrupted_at = []  # when a scenario's signal was sent
try:
    comm = cc.init()
    x = np.ones(100_000, dtype=np.float32)
    for step in range(5):
        if scenario == "mismatch" and rank == 1 and step == 2:
            x = np.ones(99_999, dtype=np.float32)  # disagrees on the length
        if scenario == "killed" and rank == 2 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if scenario == "stopped" and rank == 2 and step == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # alive, connections open, silent
        if scenario == "abort" and rank == 2 and step == 2:
            time.sleep(3)  # rank 0 is waiting for this rank when it aborts
        if scenario in ("hang", "interrupt", "close-in-handler") and rank == 2 and step == 2:
            time.sleep(2 * comm.config.timeout)  # silent, but alive: no connection ends
        if scenario == "abort" and rank == 0 and step == 2:
            threading.Timer(0.5, comm.abort).start()
        if scenario in ("interrupt", "close-in-handler") and rank == 0 and step == 2:
            if scenario == "close-in-handler":  # as a SIGTERM handler of a preempted job may
                signal.signal(signal.SIGUSR1, lambda *_: comm.close())
            sent = signal.SIGINT if scenario == "interrupt" else signal.SIGUSR1
            threading.Timer(1.0, lambda: (interrupted_at.append(time.monotonic()),
                                          os.kill(os.getpid(), sent))).start()
        if scenario == "fork" and step == 2:
            child = os.fork()
            if child == 0:  # a DataLoader-like worker that exits through the normal path
                comm.close()
                sys.exit(0)
            os.waitpid(child, 0)
        x[:] = 1
        comm.allreduce(x)
        assert (x == comm.size).all()
    comm.barrier()
    comm.close()
    result["ok"] = True
except BaseException as error:
    if os.getpid() != parent:
        raise  # the forked child leaves through the normal exit path
    result.update(error_type=type(error).__name__, message=str(error),
                  is_collective_error=isinstance(error, cc.CollectiveError))
    if interrupted_at:
        result["interrupt_latency"] = time.monotonic() - interrupted_at[0]
print(json.dumps(result), flush=True)
"""


def reports(results):
    return [result.report() for result in results]


def run_scenario(run_ranks, scenario, size, timeout_s=10.0, ranks=None, env=None):
    env = {"COLLECTIVES_TIMEOUT": str(timeout_s), **(env or {})}
    return run_ranks(SCENARIO_SCRIPT, size, args=[scenario], env=env, ranks=ranks, timeout=timeout_s * 4 + 30)


@pytest.mark.parametrize("scenario", ["healthy", "fork"])
def test_healthy_job_with_the_same_timeout_completes(run_ranks, scenario):
    for report in reports(run_scenario(run_ranks, scenario, 3)):
        assert report.get("ok"), report


def test_mismatched_lengths_fail_on_every_rank(run_ranks):
    start = time.monotonic()
    found = reports(run_scenario(run_ranks, "mismatch", 3))
    assert time.monotonic() - start < 30  # reported, not waited out
    for report in found:
        assert report["error_type"] == "CollectiveError", report
        assert "allreduce #" in report["message"] and "rank " in report["message"], report
    # At least one rank saw the disagreement itself and says what differed.
    assert any("99999" in r["message"] or "100000" in r["message"] for r in found), found


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killed_rank_fails_the_survivors_naming_it(run_ranks, transport):
    shm_before = _shared_memory_of_collectives()
    start = time.monotonic()
    results = run_scenario(run_ranks, "killed", 4, env=transport_env(transport))
    survivors = [r for r in results if r.returncode != -signal.SIGKILL]
    assert len(survivors) == 3
    for report in reports(survivors):
        assert report["is_collective_error"], report
        assert re.search(r"\brank 2\b", report["message"]), report
        assert "allreduce #" in report["message"], report
    assert time.monotonic() - start < 10.0 + 30  # seen at once (the timeout is 10 s), not waited out
    # Shared memory lives in memfds: nothing is left behind, kill -9 included.
    assert _shared_memory_of_collectives() <= shm_before


def _shared_memory_of_collectives():
    """/dev/shm's files named for collectives (its segments' names: collectives-shm,
    collectives-board); the tests running beside this one may add and remove their own (MPI's)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("collectives")}


# On one host the all-reduce goes through the shared board, which knows who has not arrived;
# over TCP, through the ring.
@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_a_silent_rank_times_out_everywhere(run_ranks, transport):
    start = time.monotonic()
    results = run_scenario(run_ranks, "hang", 3, timeout_s=3.0, env={"COLLECTIVES_TRANSPORT": transport})
    survivors = reports(r for i, r in enumerate(results) if i != 2)
    for report in survivors:
        assert report["error_type"] == "TimeoutError", report
        assert "died" not in report["message"] and "closed" not in report["message"], report
        # On the ring rank 1 waits on rank 0, which waits on rank 2: both name rank 2, whether
        # rank 0 times out first (on rank 2 itself) or rank 1 does (and traces it to rank 2).
        named = (r": rank 2 \(\S+\) did not reach the shared-memory barrier" if transport == "auto" else
                 r"timed out waiting for rank 2 |: rank 2 \(\S+\) (waits to receive from no rank|did not answer)")
        assert re.search(named, report["message"]), report
    assert time.monotonic() - start < 60


def test_a_stopped_worker_under_the_reduction_server_is_named_by_every_survivor(run_ranks):
    """Rank 2 is stopped (SIGSTOP) before its all-reduce: the reducers wait for its chunks and
    say so in their heartbeats, so each survivor's error names rank 2; neither survivor is
    called dead, nor is the reducers' relay of a survivor's failure."""
    def kill_the_stopped_rank(procs):
        deadline = time.monotonic() + 60
        while any(procs[f"rank {r}"].poll() is None for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs["rank 2"].kill()

    start = time.monotonic()
    results = run_ranks(SCENARIO_SCRIPT, 3, args=["stopped"], reducers=2, timeout=90, during=kill_the_stopped_rank,
                        env={"COLLECTIVES_TIMEOUT": "3", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "1"})
    for report in reports(results[:2]):
        assert report["is_collective_error"], report
        assert "allreduce #2" in report["message"] and "from rank 2" in report["message"], report
        assert "died" not in report["message"], report
    for reducer in results[3:]:
        assert "from rank 2" in reducer.stderr and "aborted the job" in reducer.stderr, reducer.stderr[-3000:]
        assert "died" not in reducer.stderr, reducer.stderr[-3000:]
    assert time.monotonic() - start < 60


def test_wrong_secret_is_refused_on_every_rank(run_ranks):
    results = run_ranks(SCENARIO_SCRIPT, 3, args=["healthy"], env={"COLLECTIVES_TIMEOUT": "10"},
                        rank_env=lambda r: {"COLLECTIVES_TOKEN": "not-the-job-secret"} if r == 1 else None,
                        timeout=60)
    for report in reports(results):
        assert report["is_collective_error"], report
        assert "not-the-job-secret" not in report["message"]
        assert "rank" in report["message"], report
    assert any(r["error_type"] == "AuthenticationError" for r in reports(results))


def test_other_protocol_version_is_refused_at_connect(run_ranks):
    found = reports(run_scenario(run_ranks, "protocol", 2))
    for report in found:
        assert report["is_collective_error"], report
    assert any(r["error_type"] == "ProtocolVersionError" for r in found), found
    assert any("protocol" in r["message"] for r in found), found


def test_abort_wakes_local_waiters_and_fails_peers(run_ranks):
    for report in reports(run_scenario(run_ranks, "abort", 3)):
        assert report["is_collective_error"], report
        assert "rank 0 called abort()" in report["message"], report


def test_ctrl_c_during_a_wait_raises_keyboard_interrupt_promptly(run_ranks):
    results = run_scenario(run_ranks, "interrupt", 3, timeout_s=10.0)
    interrupted = reports(results)[0]
    assert interrupted["error_type"] == "KeyboardInterrupt", interrupted
    assert interrupted["interrupt_latency"] < 1.0, interrupted


def test_closing_from_a_signal_handler_during_a_blocking_collective_ends_it(run_ranks):
    """The handler runs on the thread that runs the collective (a blocking call runs it on the
    caller's thread): close() ends it instead of waiting on itself, and the peers hear why."""
    results = reports(run_scenario(run_ranks, "close-in-handler", 3, timeout_s=10.0))
    closer, waiting = results[0], results[1]
    assert closer["is_collective_error"], closer
    assert "rank 0 closed its communicator during a collective" in closer["message"], closer
    assert closer["interrupt_latency"] < 1.0, closer
    assert waiting["is_collective_error"] and "rank 0" in waiting["message"], waiting


BAD_ARGUMENTS_SCRIPT = r"""
import json
import numpy as np
import collectives as cc

comm = cc.init()
cases = {
    "avg of integers": (ValueError, lambda: comm.allreduce(np.ones(4, np.int32), op="avg")),
    "unknown op": (ValueError, lambda: comm.allreduce(np.ones(4, np.float32), op="mean")),
    "unsupported dtype": (TypeError, lambda: comm.allreduce(np.ones(4, np.complex64))),
    "not contiguous": (TypeError, lambda: comm.allreduce(np.ones((4, 4), np.float32)[:, 0])),
    "read-only": (TypeError, lambda: comm.allreduce(np.frombuffer(b"\0" * 16, np.float32))),
    "not a buffer": (TypeError, lambda: comm.allreduce([1.0, 2.0])),
    "foreign byte order": (TypeError, lambda: comm.allreduce(np.ones(4, ">f4"))),
    "indivisible reduce_scatter": (ValueError, lambda: comm.reduce_scatter(np.ones(comm.size * 2 + 1, np.float32))),
    "root out of range": (ValueError, lambda: comm.broadcast(np.ones(4, np.float32), root=comm.size)),
}
raised = {}
for name, (expected, call) in cases.items():
    try:
        call()
        raised[name] = "nothing"
    except expected as error:
        raised[name] = "ok" if str(error) else "empty message"
    except Exception as error:
        raised[name] = f"{type(error).__name__}: {error}"
x = np.ones(10, np.float32)
comm.allreduce(x)  # nothing was sent by the bad calls: the job goes on
print(json.dumps({"raised": raised, "sum_ok": bool((x == comm.size).all())}))
comm.close()
"""


def test_bad_arguments_raise_before_anything_is_sent(run_ranks):
    for result in run_ranks(BAD_ARGUMENTS_SCRIPT, 3, timeout=60):
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.report()
        assert all(v == "ok" for v in report["raised"].values()), report
        assert report["sum_ok"]


# A daemon thread that comes back from the core while the interpreter finalizes (the torch
# backend's completer, whose Work the exit's close() just finished) used to end the process
# with "terminate called without an active exception" (CPython ends such a thread with
# pthread_exit, inside the destructor that took the GIL back). Here a daemon thread keeps
# calling a kernel that releases the GIL while the main thread exits: every run hit it.
EXIT_WHILE_A_THREAD_IS_IN_THE_CORE = r"""
import sys, threading, time
import numpy as np
from collectives import _core

n = 2_000_000
a, b = np.ones(n, np.float32), np.ones(n, np.float32)

def keep_reducing():
    while True:
        _core.kernels.reduce_into(a.ctypes.data, b.ctypes.data, n, "float32", "prod", "scalar")

threading.Thread(target=keep_reducing, daemon=True).start()
time.sleep(0.05)
sys.exit(3)
"""


def test_exiting_while_a_daemon_thread_is_in_the_core_exits_cleanly(tmp_path):
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_WHILE_A_THREAD_IS_IN_THE_CORE], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 3 and "terminate" not in done.stderr, (done.returncode, done.stderr[-2000:])
