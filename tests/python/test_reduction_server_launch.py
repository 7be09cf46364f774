"""Launching reducers: settings, store mode (COLLECTIVES_* and torchrun workers, reducers
started by `collectives-reducer --rendezvous`), the MPMD mpirun job, and the refusals (a
missing reducer, one too many, a wrong secret, strangers at a reducer's port); and losing
them mid-job (SIGTERM, SIGKILL, all of them; also while async all-reduces of several
sizes stream back to back).

Every job checks its all-reduces against numpy; the reduction server's numerics have tests
of their own.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_env import REDUCER_COMMAND, clean_environ

from collectives import _handshake
from collectives._bootstrap import bootstrap
from collectives._config import Config
from collectives._store import SIGNATURE_BYTES, StoreClient, StoreServer
from collectives.errors import AuthenticationError, CollectiveError

pytestmark = pytest.mark.timeout(180)

# All-reduces checked against numpy's left fold over ranks (of small integers, so exact in
# any order); then, with TEST_STOP_FILE, all-reduces again until that file exists. Prints
# one JSON report; exits 3 if init failed.
WORKER_SCRIPT = r'''
import json, os, sys, time
from pathlib import Path
import numpy as np
import collectives as cc

time.sleep(float(os.environ.get("TEST_DELAY", "0")))

def inputs(seed, count, size):
    return [np.random.default_rng([seed, r]).integers(-3, 4, count).astype(np.float32) for r in range(size)]

def checked_allreduce(comm, seed, count, op="sum"):
    mine = inputs(seed, count, comm.size)
    x = mine[comm.rank].copy()
    comm.allreduce(x, op=op)
    expected = mine[0].copy()
    for y in mine[1:]:
        expected += y
    if op == "avg":
        expected /= np.float32(comm.size)
    return bool(np.array_equal(x, expected))

try:
    comm = cc.init()
except (cc.CollectiveError, ValueError) as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(3)
with comm:
    ok = all(checked_allreduce(comm, seed, count) for seed, count in enumerate([0, 1, 2, 1009, 300007]))
    ok = ok and checked_allreduce(comm, 99, 4099, op="avg")
    steps = 0
    if os.environ.get("TEST_STOP_FILE"):
        Path(os.environ["TEST_RUNNING_DIR"], str(comm.rank)).touch()
        give_up = time.monotonic() + 90
        while True:
            stop = np.array([os.path.exists(os.environ["TEST_STOP_FILE"]) or time.monotonic() > give_up], np.int32)
            comm.broadcast(stop, root=0)  # rank 0 decides, so that every rank does as many steps
            if stop[0]:
                break
            steps += 1
            ok = checked_allreduce(comm, 1000 + steps, 65537) and ok
    print(json.dumps({"rank": comm.rank, "size": comm.size, "algorithm": comm.algorithm, "ok": ok, "steps": steps,
                      "reducers": comm.reducer_stats()}))
'''

TOKEN_ENV = "COLLECTIVES_TOKEN"


def _reports(results):
    return [r.report() for r in results]


def _check_workers(results, n, r, algorithm="reduction_server"):
    for rank, result in enumerate(results[:n]):
        assert result.returncode == 0, f"rank {rank} (rc {result.returncode}):\n{result.stderr[-4000:]}"
        report = result.report()
        assert report["ok"], report
        assert report["algorithm"] == algorithm, report
        assert [s["name"].split(" (")[0] for s in report["reducers"]] == [f"reducer {i}" for i in range(r)], report
        assert all(s["alive"] for s in report["reducers"]), report
        if algorithm == "reduction_server":
            assert all(s["bytes_sent"] > 0 and s["bytes_received"] > 0 for s in report["reducers"]), report


def _check_reducers(results, n, r, stats_dir, served=True):
    for index, result in enumerate(results):
        assert result.returncode == 0, f"reducer {index} (rc {result.returncode}):\n{result.stderr[-4000:]}"
        assert "Traceback" not in result.stderr, result.stderr
    found = [json.loads(path.read_text()) for path in sorted(stats_dir.glob("reducer-*.json"))]
    assert sorted(report["reducer"] for report in found) == list(range(r))
    for report in found:
        assert report["outcome"] == "ok" and report["workers"] == n and report["num_reducers"] == r, report
        assert report["totals"]["workers_connected"] == 0, report  # every worker has closed
        if served:
            assert report["totals"]["bytes_received"] > 0 and report["totals"]["chunks_reduced"] > 0, report


def _stats_args(stats_dir):
    return lambda index: ["--stats-json", stats_dir / f"reducer-{index}.json", "--stats-interval", "0.2"]


# --- settings -------------------------------------------------------------------------------

def test_reduction_server_settings():
    assert (Config().rs_chunk_bytes, Config().rs_inflight, Config().rs_heartbeat_timeout, Config().rs_fallback) == \
        (None, None, 10.0, "error")
    config = Config.from_env(environ={
        "COLLECTIVES_RS_CHUNK_BYTES": "256K", "COLLECTIVES_RS_INFLIGHT": "4", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "2.5",
        "COLLECTIVES_RS_FALLBACK": "Ring", "COLLECTIVES_NUM_REDUCERS": "3"})
    assert (config.rs_chunk_bytes, config.rs_inflight, config.rs_heartbeat_timeout, config.rs_fallback,
            config.num_reducers) == (256 << 10, 4, 2.5, "ring", 3)
    assert {"num_reducers", "rs_chunk_bytes", "rs_inflight", "rs_fallback", "algorithm"} <= \
        {name for name, _ in config.must_match()}
    assert config.as_dict()["COLLECTIVES_RS_FALLBACK"] == "ring"


@pytest.mark.parametrize("environ, message", [
    ({"COLLECTIVES_RS_INFLIGHT": "0"}, "COLLECTIVES_RS_INFLIGHT='0' must be an integer >= 1"),
    ({"COLLECTIVES_RS_CHUNK_BYTES": "big"}, "COLLECTIVES_RS_CHUNK_BYTES='big' is not a byte count"),
    ({"COLLECTIVES_RS_FALLBACK": "retry"}, "choose one of error, ring"),
    ({"COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "-1"}, "must be a positive"),
    ({"COLLECTIVES_NUM_REDUCERS": "2", "COLLECTIVES_TIMEOUT": "10"},
     "COLLECTIVES_RS_HEARTBEAT_TIMEOUT=10 s must be shorter than COLLECTIVES_TIMEOUT=10 s"),
])
def test_bad_reduction_server_settings_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        Config.from_env(environ=environ)


def test_a_short_timeout_without_reducers_needs_no_heartbeat_setting():
    assert Config.from_env(environ={"COLLECTIVES_TIMEOUT": "3"}).timeout == 3.0
    assert Config(timeout=3, num_reducers=1, rs_heartbeat_timeout=1).num_reducers == 1


def test_effective_algorithm():
    assert Config().effective_algorithm == "auto"  # the ring or recursive doubling, per call
    assert Config(num_reducers=2).effective_algorithm == "reduction_server"
    assert Config(num_reducers=2, algorithm="ring").effective_algorithm == "ring"
    Config(algorithm="reduction_server", num_reducers=1).check_runnable()
    with pytest.raises(ValueError, match="COLLECTIVES_NUM_REDUCERS=R"):
        Config(algorithm="reduction_server").check_runnable()
    Config(algorithm="hierarchical").check_runnable()  # with or without reducers (issue 12)
    assert Config(algorithm="hierarchical", num_reducers=2).effective_algorithm == "hierarchical"


def test_reduction_server_without_reducers_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="needs reducers"):
        bootstrap(environ={"COLLECTIVES_ALGORITHM": "reduction_server"})
    with pytest.raises(ValueError, match="needs reducers"):
        bootstrap(rank=0, size=2, rendezvous="127.0.0.1:1", environ={"COLLECTIVES_ALGORITHM": "reduction_server",
                                                                     TOKEN_ENV: "t"})


MESH_ONLY_SCRIPT = r'''
import json, sys
from collectives._bootstrap import bootstrap
from collectives.errors import CollectiveError
try:
    bootstrap().close()
    print(json.dumps({"error": None}))
except (CollectiveError, ValueError) as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
'''


def test_reduction_server_settings_that_differ_fail_every_worker(run_ranks):
    results = run_ranks(MESH_ONLY_SCRIPT, 2, env={"COLLECTIVES_TIMEOUT": "30"}, timeout=60,
                        rank_env=lambda rank: {"COLLECTIVES_RS_CHUNK_BYTES": "64K"} if rank == 1 else None)
    for report in _reports(results):
        assert report["error"] == "CollectiveError", report
        assert "rank 1 has rs_chunk_bytes=65536 where rank 0 has None" in report["message"], report


# --- store mode -----------------------------------------------------------------------------

@pytest.mark.parametrize("launcher, n, r, algorithm", [
    ("collectives", 2, 1, "auto"),
    ("collectives", 3, 2, "reduction_server"),
    ("torchrun", 2, 3, "auto"),  # more reducers than workers
    ("collectives", 2, 1, "ring"),  # reducers present but not used: they still see the workers out
    ("collectives", 2, 0, "auto"),
])
def test_store_mode(run_ranks, tmp_path, launcher, n, r, algorithm):
    results = run_ranks(WORKER_SCRIPT, n, launcher=launcher, reducers=r, reducer_args=_stats_args(tmp_path),
                        env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_ALGORITHM": algorithm}, timeout=120)
    expected = "reduction_server" if r and algorithm != "ring" else algorithm
    _check_workers(results, n, r, expected)
    _check_reducers(results[n:], n, r, tmp_path, served=expected == "reduction_server")
    for result in results[n:]:
        assert f"all {n} workers connected" in result.stderr and f"served {n} workers" in result.stderr


def test_reducers_may_start_before_the_workers(run_ranks, tmp_path):
    """A reducer waits (and retries the store) until worker 0 serves it."""
    results = run_ranks(WORKER_SCRIPT, 2, reducers=2, reducer_args=_stats_args(tmp_path), timeout=120,
                        env={"COLLECTIVES_TIMEOUT": "60"}, rank_env=lambda rank: {"TEST_DELAY": "2"})
    _check_workers(results, 2, 2)
    _check_reducers(results[2:], 2, 2, tmp_path)


def test_missing_reducer_fails_every_worker_naming_it(run_ranks, tmp_path):
    start = time.monotonic()
    # The reducer waits longer than the workers, to hear from them why the job failed.
    results = run_ranks(WORKER_SCRIPT, 3, reducers=1, timeout=60,
                        reducer_args=lambda index: [*_stats_args(tmp_path)(index), "--timeout", "30"],
                        env={"COLLECTIVES_TIMEOUT": "4", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "2",
                             "COLLECTIVES_NUM_REDUCERS": "2"})
    assert time.monotonic() - start < 30
    for result in results[:3]:
        assert result.returncode == 3, result.stderr[-3000:]
        report = result.report()
        assert report["error"] == "TimeoutError", report
        assert "reducer 1 of 2 did not publish its address at the rendezvous 127.0.0.1:" in report["message"]
        assert "within 4 s" in report["message"] and "collectives-reducer --rendezvous" in report["message"]
    reducer = results[3]
    assert reducer.returncode == 1 and "reducer 1 of 2 did not publish" in reducer.stderr, reducer.stderr
    assert json.loads((tmp_path / "reducer-0.json").read_text())["outcome"] == "failed"


def test_one_reducer_too_many_is_refused_and_the_job_goes_on(run_ranks, tmp_path):
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()

    def stop_once_one_is_refused(procs):  # a reducer that came after the job ended would find no store
        _wait_for(lambda: procs["reducer 0"].poll() is not None or procs["reducer 1"].poll() is not None,
                  "a reducer to be refused")
        stop.touch()

    results = run_ranks(WORKER_SCRIPT, 2, reducers=2, reducer_args=_stats_args(tmp_path), timeout=120,
                        env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_NUM_REDUCERS": "1",
                             "TEST_STOP_FILE": str(stop), "TEST_RUNNING_DIR": str(running)},
                        during=stop_once_one_is_refused)
    _check_workers(results, 2, 1)
    refused = [r for r in results[2:] if r.returncode != 0]
    assert len(refused) == 1, [r.stderr for r in results[2:]]
    assert refused[0].returncode == 1
    assert "more reducers than COLLECTIVES_NUM_REDUCERS=1 joined the job" in refused[0].stderr
    assert "Traceback" not in refused[0].stderr


def test_reducer_with_a_wrong_secret_is_refused(run_ranks, tmp_path):
    bad_token = "not-the-job-token-" + "y" * 20
    results = run_ranks(WORKER_SCRIPT, 2, reducers=1, reducer_args=_stats_args(tmp_path), timeout=60,
                        env={"COLLECTIVES_TIMEOUT": "20"}, reducer_env=lambda index: {TOKEN_ENV: bad_token})
    for result in results[:2]:  # the reducer cannot read the job, nor the workers its record
        report = result.report()
        assert report["error"] == "AuthenticationError", report
        assert "refused the record 'collectives/reducer/0'" in report["message"], report
        assert "different COLLECTIVES_TOKEN values" in report["message"], report
    reducer = results[2]
    assert reducer.returncode == 1, reducer.stderr
    assert "refused the record 'collectives/job'" in reducer.stderr
    for result in results:
        assert bad_token not in result.stdout + result.stderr


def _wait_for(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_strangers_at_a_reducer_do_not_disturb_the_job(run_ranks, tmp_path, reserve_port):
    """While the job runs: garbage bytes, a wrong secret, a second 'rank 0' with the right
    one, and a silent connection reach the reducer; each is refused and logged."""
    port, token = reserve_port(), "the-job-token-" + "z" * 20
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()
    refusals = {}

    def strangers(procs):
        _wait_for(lambda: len(list(running.iterdir())) == 2, "the workers to start")
        store = StoreClient("127.0.0.1", port, timeout=20)
        record = json.loads(store.get("collectives/reducer/0", timeout=20)[:-SIGNATURE_BYTES])
        job_id = store.get("collectives/job", timeout=20)[:-SIGNATURE_BYTES]  # the store is public: a stranger reads it
        store.close()
        address = (record["host"], record["port"])
        silent = socket.create_connection(address)
        with socket.create_connection(address) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: reducer\r\n\r\n" * 10)
            garbage.settimeout(20)
            try:
                refusals["garbage closed"] = garbage.recv(4096) == b""
            except ConnectionResetError:  # closed with our bytes unread
                refusals["garbage closed"] = True
        for name, secret in (("wrong secret", b"not the secret"), ("duplicate", token.encode())):
            with socket.create_connection(address) as sock:
                try:
                    _handshake.client_handshake(sock, secret, 0, 0, 0, time.monotonic() + 20, job_id=job_id,
                                                peer_role=_handshake.ROLE_REDUCER)
                    refusals[name] = "accepted"
                except CollectiveError as e:
                    refusals[name] = f"{type(e).__name__}: {e}"
        time.sleep(0.5)  # a few more all-reduces with the strangers around
        stop.touch()
        silent.close()

    results = run_ranks(WORKER_SCRIPT, 2, reducers=1, reducer_args=_stats_args(tmp_path), timeout=150,
                        env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}",
                             TOKEN_ENV: token, "TEST_STOP_FILE": str(stop), "TEST_RUNNING_DIR": str(running)},
                        during=strangers)
    _check_workers(results, 2, 1)
    assert all(r.report()["steps"] > 0 for r in results[:2])
    _check_reducers(results[2:], 2, 1, tmp_path)
    assert refusals["garbage closed"], refusals
    assert refusals["wrong secret"].startswith(AuthenticationError.__name__), refusals
    assert "rank 0 is connected already" in refusals["duplicate"], refusals
    assert json.loads((tmp_path / "reducer-0.json").read_text())["samples"], "no --stats-interval samples"
    log = results[2].stderr
    assert "MB/s" in log and "chunks reduced/s" in log and "CPU" in log, log  # the --stats-interval lines
    assert log.count("refused a connection from") >= 3, log
    assert "is not a collectives process" in log and "rank 0 is connected already" in log, log
    assert token not in log


def test_strangers_at_a_workers_port_do_not_stop_the_start(run_ranks, reserve_port):
    """While rank 0 waits for rank 1 (which starts late), a stranger sends rank 0 a hello of
    another protocol version and one with a wrong secret: rank 0 drops both and the job starts."""
    port = reserve_port()
    outcomes = {}

    def strangers(procs):
        store = StoreClient("127.0.0.1", port, timeout=20)
        record = json.loads(store.get("collectives/addr/0", timeout=20)[:-SIGNATURE_BYTES])
        job_id = store.get("collectives/job", timeout=20)[:-SIGNATURE_BYTES]
        store.close()
        address = (record["host"], record["port"])
        with socket.create_connection(address) as sock:
            sock.sendall(b"COLL" + (_handshake.PROTOCOL_VERSION + 7).to_bytes(2, "big"))
            sock.settimeout(20)
            outcomes["version"] = sock.recv(64)
        with socket.create_connection(address) as sock:
            try:
                _handshake.client_handshake(sock, b"not the secret", 1, 0, 0, time.monotonic() + 20, job_id=job_id)
                outcomes["secret"] = "accepted"
            except CollectiveError as e:
                outcomes["secret"] = type(e).__name__

    results = run_ranks(WORKER_SCRIPT, 2, timeout=120, during=strangers,
                        env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}"},
                        rank_env=lambda rank: {"TEST_DELAY": "3"} if rank == 1 else None)
    _check_workers(results, 2, 0, algorithm="auto")
    assert outcomes["secret"] == AuthenticationError.__name__, outcomes
    assert "dropped an incoming connection" in results[0].stderr


def test_sigterm_stops_a_reducer_quietly_and_the_others_take_over(run_ranks, tmp_path):
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()

    def terminate_reducer_1(procs):
        _wait_for(lambda: len(list(running.iterdir())) == 2, "the workers to start")
        time.sleep(0.5)
        procs["reducer 1"].send_signal(signal.SIGTERM)
        procs["reducer 1"].wait(timeout=30)
        time.sleep(1.0)  # all-reduces without it
        stop.touch()

    results = run_ranks(WORKER_SCRIPT, 2, reducers=2, reducer_args=_stats_args(tmp_path), timeout=150,
                        env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "5",
                             "TEST_STOP_FILE": str(stop), "TEST_RUNNING_DIR": str(running)},
                        during=terminate_reducer_1)
    # The reducers claimed their indices in the order they reached the store.
    stopped_report = json.loads((tmp_path / "reducer-1.json").read_text())
    assert stopped_report["outcome"] == "stopped", stopped_report
    for result in results[:2]:
        assert result.returncode == 0, result.stderr[-4000:]
        report = result.report()
        assert report["ok"] and report["steps"] > 0, report
        assert [s["alive"] for s in report["reducers"]] == [i != stopped_report["reducer"] for i in range(2)], report
    survivor, stopped = results[2], results[3]
    assert survivor.returncode == 0, survivor.stderr[-4000:]
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    assert "stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr


def test_sigkill_of_a_reducer_mid_sequence_loses_nothing(run_ranks, tmp_path):
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()

    def kill_reducer_1(procs):
        _wait_for(lambda: len(list(running.iterdir())) == 3, "the workers to start")
        time.sleep(0.5)
        procs["reducer 1"].kill()
        time.sleep(1.5)  # all-reduces without it
        stop.touch()

    results = run_ranks(WORKER_SCRIPT, 3, reducers=3, timeout=150, during=kill_reducer_1,
                        env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "5",
                             "TEST_STOP_FILE": str(stop), "TEST_RUNNING_DIR": str(running)})
    killed = None
    for result in results[:3]:
        assert result.returncode == 0, result.stderr[-4000:]
        report = result.report()
        assert report["ok"] and report["steps"] > 0, report  # every result checked against numpy
        dead = [i for i, s in enumerate(report["reducers"]) if not s["alive"]]
        assert len(dead) == 1 and killed in (None, dead[0]), report
        killed = dead[0]
        # The survivors took over: each moved more than the dead one did before it died.
        survivors = [s for i, s in enumerate(report["reducers"]) if i != killed]
        assert all(s["bytes_sent"] > report["reducers"][killed]["bytes_sent"] for s in survivors), report
        assert "failed: it" in result.stderr and "go to the other reducers" in result.stderr, result.stderr
        assert "on the ring" not in result.stderr  # no fallback (it is off by default, too)
    assert results[3 + 1].returncode == -signal.SIGKILL
    assert all(r.returncode == 0 for i, r in enumerate(results[3:]) if i != 1)


KILL_ALL_SCRIPT = r'''
import json, os, time
from pathlib import Path
import numpy as np
import collectives as cc

with cc.init() as comm:
    Path(os.environ["TEST_RUNNING_DIR"], str(comm.rank)).touch()
    started = time.monotonic()
    try:
        while True:
            comm.allreduce(np.ones(100000, np.float32))
    except cc.CollectiveError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - started}))
'''


def test_killing_every_reducer_fails_every_worker_within_the_timeout(run_ranks, tmp_path):
    running = tmp_path / "running"
    running.mkdir()

    def kill_all(procs):
        _wait_for(lambda: len(list(running.iterdir())) == 2, "the workers to start")
        time.sleep(0.3)
        for label in ("reducer 0", "reducer 1"):
            procs[label].kill()

    results = run_ranks(KILL_ALL_SCRIPT, 2, reducers=2, timeout=120, during=kill_all,
                        env={"COLLECTIVES_TIMEOUT": "30", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "5",
                             "TEST_RUNNING_DIR": str(running)})
    for result in results[:2]:
        assert result.returncode == 0, result.stderr[-4000:]
        report = result.report()
        assert report["error"] == "CollectiveError", report
        assert "all 2 reducers failed" in report["message"] and "COLLECTIVES_RS_FALLBACK=ring" in report["message"]
        assert report["seconds"] < 30, report  # well within the collective timeout


# Rounds of all-reduces of several sizes issued back to back, each round's all waiting at once
# (the communicator puts the next ones' chunks on the wire while the earlier ones' sums are
# still coming back: DDP's buckets), each result compared bit for bit with numpy's left fold
# over ranks of floats whose sums depend on the order of the additions. Rank 0 says when to
# stop (TEST_STOP_FILE). One JSON report; a failure is reported with its message.
STREAM_SCRIPT = r"""
import json, os, time
from pathlib import Path
import numpy as np
import collectives as cc

COUNTS = [65537, 1, 300007, 7, 131072, 4099]

def inputs(seed, count, size):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-1, 1, count) * 2.0 ** rng.integers(-20, 21, count)).astype(np.float32)
            for _ in range(size)]

with cc.init() as comm:
    Path(os.environ["TEST_RUNNING_DIR"], str(comm.rank)).touch()
    report = {"ok": True, "rounds": 0, "error": None}
    started = time.monotonic()
    try:
        while True:
            stop = np.array([os.path.exists(os.environ["TEST_STOP_FILE"])], np.int32)
            comm.broadcast(stop, root=0)
            if stop[0]:
                break
            batch = []
            for k, count in enumerate(COUNTS):
                mine = inputs([report["rounds"], k], count, comm.size)
                expected = mine[0].copy()
                for y in mine[1:]:
                    expected += y
                x = mine[comm.rank]
                batch.append((comm.allreduce_async(x), x, expected))
            for work, x, expected in batch:
                work.wait()
                report["ok"] = report["ok"] and x.tobytes() == expected.tobytes()
            report["rounds"] += 1
        report["reducers"] = comm.reducer_stats()
    except cc.CollectiveError as e:
        report["error"] = {"type": type(e).__name__, "message": str(e)}
    report["seconds"] = time.monotonic() - started
    print(json.dumps(report))
"""


def _stream(run_ranks, tmp_path, killed, linger):
    """3 workers and 2 reducers (16K chunks: the larger all-reduces span many) run
    STREAM_SCRIPT; `killed` reducers are SIGKILLed once every worker streams, `linger`
    seconds before the stop file is made. The workers' reports and the reducers' results."""
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()

    def kill(procs):
        _wait_for(lambda: len(list(running.iterdir())) == 3, "the workers to start")
        time.sleep(0.5)
        for index in killed:
            procs[f"reducer {index}"].kill()
        time.sleep(linger)
        stop.touch()

    results = run_ranks(STREAM_SCRIPT, 3, reducers=2, timeout=120, during=kill,
                        env={"COLLECTIVES_RS_CHUNK_BYTES": "16K", "COLLECTIVES_TIMEOUT": "30",
                             "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": "5", "TEST_STOP_FILE": str(stop),
                             "TEST_RUNNING_DIR": str(running)})
    for rank, result in enumerate(results[:3]):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-4000:]}"
    return [result.report() for result in results[:3]], results[3:]


def test_back_to_back_async_allreduces_survive_a_reducer_killed_mid_stream(run_ranks, tmp_path):
    reports, reducers = _stream(run_ranks, tmp_path, killed=[1], linger=1.0)
    for report in reports:
        assert report["error"] is None and report["ok"], report  # every result numpy's bits
        assert report["rounds"] >= 2, report
        assert [s["alive"] for s in report["reducers"]].count(False) == 1, report
    assert len({report["rounds"] for report in reports}) == 1, reports
    assert reducers[1].returncode == -signal.SIGKILL and reducers[0].returncode == 0


def test_killing_every_reducer_mid_stream_fails_every_worker_within_the_timeout(run_ranks, tmp_path):
    reports, reducers = _stream(run_ranks, tmp_path, killed=[0, 1], linger=0.5)
    for report in reports:
        assert report["ok"], report  # the all-reduces before the kill were right
        assert report["error"] is not None and report["error"]["type"] == "CollectiveError", report
        assert "all 2 reducers failed" in report["error"]["message"], report
        assert report["seconds"] < 30, report  # an error well within the collective timeout, not a hang
    assert all(r.returncode == -signal.SIGKILL for r in reducers)


# --- mpirun: one MPMD job -------------------------------------------------------------------

@pytest.mark.mpi
def test_mpmd_job(run_mpirun, tmp_path):
    n, r = 3, 2
    result = run_mpirun(WORKER_SCRIPT, n, reducers=r, reducer_args=_stats_args(tmp_path),
                        env={"COLLECTIVES_TIMEOUT": "60"}, timeout=150)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    reports = sorted(result.reports(), key=lambda report: report["rank"])
    assert [report["rank"] for report in reports] == list(range(n))
    for report in reports:
        assert report["ok"] and report["size"] == n and report["algorithm"] == "reduction_server", report
        assert [s["name"].split(" (")[0] for s in report["reducers"]] == ["reducer 0", "reducer 1"], report
    found = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("reducer-*.json"))]
    assert [(f["reducer"], f["workers"], f["num_reducers"], f["outcome"]) for f in found] == \
        [(0, n, r, "ok"), (1, n, r, "ok")]
    assert all(f["totals"]["bytes_received"] > 0 for f in found), found


SECOND_INIT_SCRIPT = r'''
import json
import numpy as np
import collectives as cc
with cc.init() as comm:
    x = np.ones(1000, np.float32)
    comm.allreduce(x)
    rank, algorithm = comm.rank, comm.algorithm
try:
    cc.init()
    error = None
except cc.CollectiveError as e:
    error = str(e)
print(json.dumps({"rank": rank, "algorithm": algorithm, "sum": float(x[0]), "error": error}))
'''


@pytest.mark.mpi
def test_a_second_communicator_in_an_mpmd_job_is_refused_not_hung(run_mpirun):
    result = run_mpirun(SECOND_INIT_SCRIPT, 2, reducers=1, env={"COLLECTIVES_TIMEOUT": "60"}, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    for report in result.reports():
        assert report["algorithm"] == "reduction_server" and report["sum"] == 2.0, report
        assert "serve the first communicator" in report["error"], report


@pytest.mark.mpi
def test_mpmd_reducer_count_that_disagrees_fails_every_process(run_mpirun, tmp_path):
    result = run_mpirun(WORKER_SCRIPT, 2, reducers=1, reducer_args=_stats_args(tmp_path),
                        env={"COLLECTIVES_TIMEOUT": "30", "COLLECTIVES_NUM_REDUCERS": "2"}, timeout=90)
    reports = result.reports()
    assert len(reports) == 2, result.stdout + result.stderr
    for report in reports:
        assert report["error"] == "ValueError", report
        assert "COLLECTIVES_NUM_REDUCERS=2, but this mpirun job holds 1 reducer" in report["message"], report
    assert json.loads((tmp_path / "reducer-0.json").read_text())["outcome"] == "failed"
    assert "rank 0 could not start the job" in result.stderr


@pytest.mark.mpi
def test_mpirun_workers_meet_reducers_started_on_their_own(run_mpirun, reserve_port, tmp_path):
    """Workers bootstrap over MPI; worker 0 serves the store where the reducers meet them."""
    rendezvous, token = f"127.0.0.1:{reserve_port()}", "the-job-token-" + "w" * 20
    reducer = subprocess.Popen([*REDUCER_COMMAND, f"--rendezvous={rendezvous}", "--stats-json",
                                str(tmp_path / "reducer-0.json")], env={**clean_environ(), TOKEN_ENV: token},
                               stderr=subprocess.PIPE, text=True)
    try:
        result = run_mpirun(WORKER_SCRIPT, 2, timeout=120, env={
            "COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RENDEZVOUS": rendezvous, "COLLECTIVES_NUM_REDUCERS": "1",
            TOKEN_ENV: token})
        _, stderr = reducer.communicate(timeout=60)
    finally:
        reducer.kill()
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    reports = result.reports()
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["ok"] and r["algorithm"] == "reduction_server" for r in reports), reports
    assert reducer.returncode == 0, stderr
    _check_reducers([], 2, 1, tmp_path)


# --- the command line -----------------------------------------------------------------------

def _reducer(*args, env=None, timeout=60):
    environ = {**clean_environ(), **(env or {})}
    return subprocess.run([*REDUCER_COMMAND, *map(str, args)], env=environ, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("args, env, code, message", [
    (["--max-memory", "lots"], {}, 2, "--max-memory='lots' is not a byte count"),
    (["--threads", "-1"], {}, 2, "--threads='-1' must be an integer >= 0"),
    (["--timeout", "0"], {}, 2, "--timeout='0' must be a positive"),
    ([], {TOKEN_ENV: "t"}, 1, "pass --rendezvous HOST:PORT"),
    (["--rendezvous", "127.0.0.1:1"], {}, 1, "COLLECTIVES_TOKEN"),
    (["--rendezvous", "127.0.0.1"], {TOKEN_ENV: "t"}, 1, "--rendezvous='127.0.0.1' is not HOST:PORT"),
    (["--rendezvous", "127.0.0.1:1", "--token-file", "/nonexistent/token"], {}, 1, "cannot read"),
])
def test_bad_command_lines_say_what_to_do(args, env, code, message):
    out = _reducer(*args, env=env)
    assert out.returncode == code, out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_no_job_at_the_rendezvous_times_out(reserve_port, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("secret-from-a-file\n")
    out = _reducer("--rendezvous", f"127.0.0.1:{reserve_port()}", "--token-file", token_file, "--timeout", "1",
                   "--stats-json", tmp_path / "stats.json")
    assert out.returncode == 1 and "could not reach the collectives store" in out.stderr, out.stderr
    assert "reducer ?" in out.stderr  # no index yet
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["outcome"] == "failed" and "could not reach" in report["error"]


def test_sigterm_while_waiting_for_the_job_exits_quietly():
    server = StoreServer("127.0.0.1", 0).start()  # a store where no job starts
    try:
        proc = subprocess.Popen([*REDUCER_COMMAND, "--rendezvous", f"127.0.0.1:{server.port}"],
                                env={**clean_environ(), TOKEN_ENV: "t"}, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        server.close()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "collectives-reducer"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "--rendezvous HOST:PORT" in out.stdout and "--token-file" in out.stdout


def test_the_reducer_imports_no_framework():
    code = ("import sys, collectives.reduction_server; "
            "print([m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"
