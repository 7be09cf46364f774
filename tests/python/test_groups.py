"""comm.split, comm.create_group and comm.topology on real processes (issue 11, "Groups"):
subgroups run over the world's connections, their collectives interleave with the world's
in orders that differ by rank, every result is checked against numpy, and torch's new_group
makes its groups the same way."""

import json
import socket

import pytest

SPLIT_SCRIPT = r'''
import json, sys
import numpy as np
import collectives as cc

comm = cc.init()
rank, size = comm.rank, comm.size
report = {"rank": rank, "topology": comm.topology}
# Evens and odds, odds ordered by descending rank (key), and a rank that takes no part.
color = None if rank == size - 1 else rank % 2
half = comm.split(color, key=-rank if rank % 2 else rank)
report["half"] = None if half is None else {"rank": half.rank, "size": half.size, "topology": half.topology}
pair = comm.create_group([0, 1]) if rank in (0, 1) else None
# Each rank starts with another communicator, and runs them all at once.
works, expected = [], []
mine = [c for c in (half, pair, comm) if c is not None]
for step in range(len(mine)):
    c = mine[(step + rank) % len(mine)]
    x = np.arange(100003, dtype=np.int64) * (rank + 1)
    works.append((c, x, c.allreduce_async(x)))
problems = []
for c, x, work in works:
    work.wait()
    members = {id(comm): list(range(size)), id(half): None, id(pair): [0, 1]}[id(c)]
    if members is None:
        members = sorted((r for r in range(size - 1) if r % 2 == rank % 2), key=lambda r: -r if r % 2 else r)
    want = np.arange(100003, dtype=np.int64) * sum(r + 1 for r in members)
    if not np.array_equal(x, want):
        problems.append(f"communicator of {members}: wrong sum")
if half is not None:
    got = half.allgather(np.array([rank], np.int64)).ravel().tolist()
    report["half_ranks"] = got
report["problems"] = problems
for c in (half, pair):
    if c is not None:
        c.close()
comm.barrier()
comm.close()
print(json.dumps(report), flush=True)
'''


@pytest.mark.parametrize("size", [3, 5])
def test_split_and_create_group_run_beside_the_world(run_ranks, size):
    results = run_ranks(SPLIT_SCRIPT, size, env={"COLLECTIVES_TOPOLOGY": "zone1/rack2"}, timeout=120)
    reports = {}
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.reports()[-1]
        reports[report["rank"]] = report
    host = socket.gethostname()
    for rank, report in reports.items():
        assert report["problems"] == [], report
        assert report["topology"] == [f"zone1/rack2/{host}"] * size
        if rank == size - 1:
            assert report["half"] is None
            continue
        # Evens ascending by rank, odds descending (their key is -rank); the last rank is out.
        members = sorted((r for r in range(size - 1) if r % 2 == rank % 2), key=lambda r: -r if r % 2 else r)
        assert report["half"]["size"] == len(members) and report["half"]["rank"] == members.index(rank), report
        assert report["half_ranks"] == members
        assert report["half"]["topology"] == [f"zone1/rack2/{host}"] * len(members)


BAD_GROUPS_SCRIPT = r'''
import json
import collectives as cc
comm = cc.init()
errors = {}
for name, call in (("color", lambda: comm.split("red")), ("twice", lambda: comm.create_group([0, 0])),
                   ("outside", lambda: comm.create_group([5])), ("not listed", lambda: comm.create_group([1 - comm.rank])),
                   ("algorithm", lambda: comm.create_group([0, 1], algorithm="reduction_server"))):
    try:
        call()
        errors[name] = None
    except (TypeError, ValueError) as e:
        errors[name] = f"{type(e).__name__}: {e}"
comm.close()
print(json.dumps(errors), flush=True)
'''


def test_bad_groups_are_refused_before_anything_is_sent(run_ranks):
    for result in run_ranks(BAD_GROUPS_SCRIPT, 2, timeout=60):
        assert result.returncode == 0, result.stderr[-3000:]
        errors = result.reports()[-1]
        assert errors["color"].startswith("TypeError: split's color must be an int"), errors
        assert "distinct ranks" in errors["twice"] and "distinct ranks" in errors["outside"], errors
        assert "is not one of them" in errors["not listed"], errors
        assert "a subgroup's algorithm is one of auto, ring, recursive_doubling" in errors["algorithm"], errors


def test_topology_label_of_this_process(tmp_path):
    import subprocess
    import sys
    from launch_env import clean_environ
    env = {**clean_environ(), "COLLECTIVES_TOPOLOGY": "zone1/rack2"}
    info = subprocess.run([sys.executable, "-m", "collectives.info", "--topology"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert info.returncode == 0 and info.stdout.strip() == f"zone1/rack2/{socket.gethostname()}", info
    env["COLLECTIVES_TOPOLOGY"] = "zone1//rack2"
    info = subprocess.run([sys.executable, "-m", "collectives.info", "--topology"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert info.returncode == 2 and "outermost first" in info.stderr, info


TORCH_SCRIPT = r'''
import json, os
import torch, torch.distributed as dist
import collectives.torch  # noqa: F401
def sockets():
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))

dist.init_process_group("collectives")
rank = dist.get_rank()
before = sockets()
evens = dist.new_group([0, 2], backend="collectives")
odds = dist.new_group([1], backend="collectives")
new_sockets = sockets() - before
mine = evens if rank % 2 == 0 else odds
t = torch.full((1000,), float(rank + 1))
dist.all_reduce(t, group=mine)
w = torch.ones(10)
dist.all_reduce(w)
sub = mine.communicator
print(json.dumps({"rank": rank, "sum": t[0].item(), "world": w[0].item(), "sub_size": sub.size,
                  "new_sockets": new_sockets}), flush=True)
dist.destroy_process_group()
'''


def test_torch_new_group_runs_over_the_worlds_connections(run_ranks):
    pytest.importorskip("torch")
    results = run_ranks(TORCH_SCRIPT, 3, launcher="torchrun", timeout=180)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.reports()[-1]
        expected = {0: 4.0, 2: 4.0, 1: 2.0}[report["rank"]]
        assert report["sum"] == expected and report["world"] == 3.0, report
        assert report["sub_size"] == (2 if report["rank"] % 2 == 0 else 1), report
        # No second bootstrap: the subgroups opened no connection of their own.
        assert report["new_sockets"] == 0, report
