"""COLLECTIVES_TRANSPORT=auto: UCX for a job across hosts where every worker's UCX sees an
RDMA-capable device, else shared memory within a host and TCP between hosts. The device test
runs on this machine's own UCX devices and on lists of real machines' (`ucx_info -d`'s
transport/device pairs); the job decision on every worker's record; and a real job here."""

import os

import pytest

from collectives import _ucx
from collectives.info import describe as describe_installation
from collectives._mesh import chosen_transport

# The tests of what this machine decides expect none (CI's machines, this project's).
without_rdma = pytest.mark.skipif(os.path.isdir("/sys/class/infiniband") and bool(os.listdir("/sys/class/infiniband")),
                                  reason="this host has RDMA devices")

# A ConnectX host's resources (`ucx_info -d` in openucx/ucx#7960 and #6853: rc_verbs, rc_mlx5,
# dc_mlx5, ud_verbs, ud_mlx5 on port mlx5_0:1 of the "ib" component; TCP over its IPoIB and
# Ethernet interfaces; shared memory).
CONNECTX_HOST = ["rc_verbs/mlx5_0:1", "rc_mlx5/mlx5_0:1", "dc_mlx5/mlx5_0:1", "ud_verbs/mlx5_0:1",
                 "ud_mlx5/mlx5_0:1", "tcp/ib0", "tcp/eth0", "tcp/lo", "sysv/memory", "posix/memory",
                 "cma/memory", "self/memory"]
# A GPU host without an RDMA NIC (openucx/ucx#8808's cuda_copy/cuda and the like): GPU copies
# and GPUDirect RDMA's copy engine are no network.
GPU_HOST_WITHOUT_RDMA = ["cuda_copy/cuda", "cuda_ipc/cuda", "gdr_copy/gdr_copy", "tcp/eth0", "tcp/lo",
                         "sysv/memory", "posix/memory", "cma/memory", "self/memory"]


def test_rdma_capable_devices_of_real_machines():
    assert _ucx.rdma_capable(CONNECTX_HOST) == CONNECTX_HOST[:5]
    assert _ucx.rdma_capable(["srd/rdmap16s27:1", "tcp/eth0"]) == ["srd/rdmap16s27:1"]  # AWS EFA
    assert _ucx.rdma_capable(GPU_HOST_WITHOUT_RDMA) == []
    assert _ucx.rdma_capable(["rc/mlx5_0:1"]) == []  # an alias of UCX_TLS, never a resource's name


@without_rdma
def test_this_machine_has_no_rdma_device_and_says_why():
    info = _ucx.describe()
    if info.get("loaded"):  # UCX's own devices here (tcp, sysv, posix, cma, self...)
        assert info["devices"] and _ucx.rdma_capable(info["devices"]) == [], info
    devices, why = _ucx.rdma_devices()
    assert devices == [] and "RDMA" in why, why
    assert describe_installation()["auto_transport"] == f"shared memory within a host, TCP between hosts (not UCX: {why})"


def _records(*devices, hosts=None):
    return [{"rdma": d, "no_rdma_why": "" if d else "no RDMA device (/sys/class/infiniband lists none)",
             "hostname": f"node{p}" if hosts is None else hosts[p]} for p, d in enumerate(devices)]


def test_the_job_runs_ucx_only_where_every_worker_sees_rdma():
    rdma = _ucx.rdma_capable(CONNECTX_HOST)
    transport, why = chosen_transport("auto", _records(rdma, rdma, rdma))
    assert transport == "ucx" and "rc_verbs/mlx5_0:1" in why, why
    transport, why = chosen_transport("auto", _records(rdma, [], rdma, []))
    assert transport == "auto", why
    assert "ranks 1, 3: no RDMA device" in why, why
    transport, why = chosen_transport("auto", _records([], []))
    assert transport == "auto" and "every rank: no RDMA device" in why, why
    assert chosen_transport("tcp", _records(rdma, rdma)) == ("tcp", "")  # asked for: never overridden
    # One host: its own shared memory, whatever NIC it has.
    assert chosen_transport("auto", _records(rdma, rdma, hosts=["node0", "node0"]))[0] == "auto"


AUTO_JOB = r"""
import json, logging
import numpy as np
import collectives as cc
logging.basicConfig(level=logging.INFO)
comm = cc.init()
out = comm.allreduce(np.full(1000, comm.rank + 1, np.float32))
with open("/proc/self/maps") as maps:
    ucx_loaded = "libucp" in maps.read()
print(json.dumps({"ok": bool((out == sum(range(1, comm.size + 1))).all()), "ucx_loaded": ucx_loaded}), flush=True)
"""


@without_rdma
def test_a_job_under_auto_on_one_host_runs_its_own_shared_memory(run_ranks):
    results = run_ranks(AUTO_JOB, 3, env={"COLLECTIVES_TRANSPORT": "auto"}, timeout=60)
    reports = [r.report() for r in results]
    assert all(r["ok"] for r in reports), reports
    assert not any(r["ucx_loaded"] for r in reports), reports  # no RDMA device: libucp is left alone
    logged = results[0].stderr
    assert "COLLECTIVES_TRANSPORT=auto: shared memory: every worker runs on one host" in logged, logged
