"""The UCX transport (COLLECTIVES_TRANSPORT=ucx): collectives against numpy over UCX's shared
memory and over its TCP, the failure model (a peer closing mid-exchange, a header that
disagrees), each wire security, and what collectives-info says of UCX. The shared suites
run over UCX too (TRANSPORTS in test_collectives, test_point_to_point, test_failures; and
scripts/test's selection under COLLECTIVES_TEST_TRANSPORT=ucx)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import collective_cases as cases_lib
from launch_env import transport_env, ucx_missing

from collectives import _ucx

pytestmark = pytest.mark.skipif(bool(ucx_missing()), reason=ucx_missing() or "UCX runs here")

INFO = Path(sys.executable).parent / "collectives-info"
UCX = transport_env("ucx")


@pytest.mark.parametrize("ucx_tls", ["tcp", "posix,sysv,cma,self"])
def test_matrix_over_each_of_ucx_transports(run_ranks, tmp_path, ucx_tls):
    """UCX over TCP (what a cluster without RDMA gets) and over its shared memory."""
    cases_lib.run_job(run_ranks, tmp_path, 3, cases_lib.matrix(3, [0, 1, 1009, 300007]),
                      env={**UCX, "UCX_TLS": ucx_tls})


def test_subgroups_and_point_to_point_share_ucx(run_ranks, tmp_path):
    """Communicators of several ids on one UCX worker: each its own stream of tags."""
    cases_lib.run_job(run_ranks, tmp_path, 4, cases_lib.rooted_matrix(4, [0, 3, 65537]), env=UCX)


CLOSE_MID_EXCHANGE = r"""
import json, os, sys
import numpy as np
import collectives as cc
rank = int(os.environ["COLLECTIVES_RANK"])
comm = cc.init()
result = {"rank": rank}
try:
    comm.allreduce(np.ones(1000, np.float32))
    if rank == 1:
        comm.close()  # rank 0 waits for a message it will never send
    else:
        comm.recv(np.zeros(10, np.float32), 1)
    result["ok"] = True
except cc.CollectiveError as error:
    result["message"] = str(error)
print(json.dumps(result), flush=True)
"""


def test_a_peer_that_closes_mid_exchange_is_reported_not_waited_out(run_ranks):
    results = run_ranks(CLOSE_MID_EXCHANGE, 2, env={**UCX, "COLLECTIVES_TIMEOUT": "60"}, timeout=45)
    waiting = results[0].report()
    assert "rank 1" in waiting.get("message", "") and "closed its communicator" in waiting["message"], waiting
    assert results[1].report().get("ok"), results[1].report()


MISMATCH = r"""
import json, os
import numpy as np
import collectives as cc
rank = int(os.environ["COLLECTIVES_RANK"])
comm = cc.init()
try:
    comm.allreduce(np.ones(1000 if rank else 999, np.float32))
    print(json.dumps({"ok": True}))
except cc.CollectiveError as error:
    print(json.dumps({"message": str(error)}), flush=True)
"""


def test_a_header_that_disagrees_fails_every_rank(run_ranks):
    reports = [r.report() for r in run_ranks(MISMATCH, 3, env={**UCX, "COLLECTIVES_TIMEOUT": "20"}, timeout=60)]
    for report in reports:
        assert "allreduce #" in report.get("message", ""), report
    assert any("999" in r["message"] and "1000" in r["message"] for r in reports), reports


@pytest.mark.parametrize("security", ["none", "aead"])
def test_each_wire_security_over_ucx(run_ranks, tmp_path, security):
    """Tags made before a header leaves and checked before a payload reaches the buffer, per
    communicator lane (subgroups, point-to-point): every result bit for bit (mac, the default,
    runs in every other test here)."""
    cases_lib.run_job(run_ranks, tmp_path, 4, cases_lib.rooted_matrix(4, [0, 3, 65537]),
                      env={**UCX, "UCX_TLS": "tcp", "COLLECTIVES_WIRE_SECURITY": security})


def test_info_shows_ucx_version_and_devices():
    out = subprocess.run([str(INFO), "--json"], capture_output=True, text=True, timeout=60, check=True)
    ucx = json.loads(out.stdout)["build"]["ucx"]
    assert ucx["built"] and ucx["loaded"], ucx
    assert ucx["version"][0].isdigit(), ucx
    assert any(device.startswith("tcp/") for device in ucx["devices"]), ucx  # loopback at least
    assert Path(ucx["library"]).resolve() == Path(_ucx.library_path()).resolve()


# Three all-reduces through two reducers, checked against numpy bit for bit, then what the
# channels to the reducers say they went over.
THROUGH_REDUCERS = r"""
import json
import numpy as np
import collectives as cc
with cc.init() as comm:
    rng = np.random.default_rng(7)
    inputs = [rng.uniform(-1, 1, (comm.size, n)).astype(np.float32) for n in (1, 1000, 300007)]
    for every in inputs:
        x = every[comm.rank].copy()
        comm.allreduce(x)
        expected = every[0].copy()
        for r in range(1, comm.size):
            expected += every[r]
        assert np.array_equal(x, expected), "the sums differ from numpy's left fold"
    print(json.dumps({"algorithm": comm.algorithm, "reducers": comm.reducer_stats()}))
"""


@pytest.mark.parametrize("security", ["none", "mac", "aead"])
def test_reducers_move_the_data_over_ucx(run_ranks, tmp_path, security):
    """Under COLLECTIVES_TRANSPORT=ucx the reducers (started without it: they follow the workers)
    take the chunks and send the sums over UCX streams, with each wire security; the TCP links
    carry the handshake and the UCX addresses only."""
    results = run_ranks(THROUGH_REDUCERS, 3, reducers=2, timeout=120,
                        env={**UCX, "COLLECTIVES_WIRE_SECURITY": security, "COLLECTIVES_RS_CHUNK_BYTES": "65536"},
                        reducer_args=lambda index: ["--stats-json", tmp_path / f"reducer-{index}.json"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    for result in results[:3]:
        report = result.report()
        assert report["algorithm"] == "reduction_server", report
        assert [r["transport"] for r in report["reducers"]] == ["ucx", "ucx"], report
        assert all(r["alive"] and r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in report["reducers"]), report
    chunk_bytes = 4 * 300007
    totals = [json.loads((tmp_path / f"reducer-{index}.json").read_text())["totals"] for index in range(2)]
    assert all(t["workers_over_ucx"] == 3 for t in totals), totals
    assert sum(t["bytes_received"] for t in totals) >= 3 * chunk_bytes, totals


def test_reducers_that_ucx_cannot_reach_fail_every_rank_saying_why(run_ranks):
    """UCX's shared memory cannot report a peer's death, which the reducers' streams need: with
    UCX_TLS holding nothing else, every worker and reducer fails at once, naming the cause."""
    script = ("import json\nimport numpy as np\nimport collectives as cc\ntry:\n"
              "    cc.init().allreduce(np.ones(10, np.float32))\n    print(json.dumps({'ok': True}))\n"
              "except cc.CollectiveError as e:\n    print(json.dumps({'message': str(e)}))\n")
    results = run_ranks(script, 2, reducers=2, timeout=60,
                        env={**UCX, "UCX_TLS": "posix,sysv,cma,self", "COLLECTIVES_TIMEOUT": "20"})
    for result in results[:2]:
        message = result.report().get("message", "")
        assert "cannot" in message and "reports a peer's death" in message, result.stdout + result.stderr[-2000:]
    for reducer in results[2:]:
        assert reducer.returncode != 0 and "reports a peer's death" in reducer.stderr, reducer.stderr[-2000:]
