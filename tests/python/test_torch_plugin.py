"""collectives.torch: the torch.distributed backend "collectives" and the DDP comm hooks.

DDP trained with collectives (ring, reducers; as the backend and as comm hooks) ends where DDP
on gloo ends, with a negative control; every ProcessGroup method against gloo's result; async
futures; a rank that fails mid-training fails the others; destroy_process_group frees all;
collectives.torch.init_process_group() under mpirun. Rank processes run under the torchrun
launcher of conftest's run_ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

import json

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import collectives as cc  # noqa: E402
import collectives.torch as cctorch  # noqa: E402

pytestmark = pytest.mark.timeout(240)

# The same model, seed and per-rank data trained for a few steps by DDP over several groups
# or hooks; prints each run's parameters' distance from DDP on gloo and their bytes' hash
# (equal on every rank). argv[1]: "backend" (collectives is the default group, gloo a
# subgroup) or "hooks" (gloo is the default group; buckets go through a Communicator).
DDP_SCRIPT = r'''
import hashlib, json, os, sys
import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import collectives as cc
import collectives.torch
from collectives.torch import hooks

def train(group=None, hook=None, state=None, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.01)  # several buckets
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rank = dist.get_rank()
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

def summing_hook(comm, bucket):  # the negative control: forgets to divide by the world size
    future = torch.futures.Future()
    future.set_result(comm.allreduce(bucket.buffer()))
    return future

def report(params, reference):
    return {"max_diff": (params - reference).abs().max().item(),
            "close": torch.allclose(params, reference, rtol=1e-5, atol=1e-6),
            "sha": hashlib.sha256(params.numpy().tobytes()).hexdigest()}

runs, info = {}, {}
if sys.argv[1] == "backend":
    dist.init_process_group("collectives")
    gloo = dist.new_group(backend="gloo")
    reference = train(gloo)
    dist.destroy_process_group(gloo)
    del gloo  # its threads end here, not while the interpreter finalizes (one that frees a tensor then aborts)
    runs["collectives"] = train()
    comm = dist.group.WORLD.communicator
else:
    dist.init_process_group("gloo")
    comm = cc.init()
    reference = train()
    runs["allreduce_hook"] = train(hook=hooks.allreduce_hook, state=comm)
    runs["summing_hook"] = train(hook=summing_hook, state=comm)
    for name in ("fp16_compress_hook", "bf16_compress_hook"):
        runs[name] = train(hook=getattr(hooks, name), state=comm)
    runs["error_feedback_compress_hook"] = train(hook=hooks.error_feedback_hook, state=hooks.ErrorFeedback(comm))
info = {"algorithm": comm.algorithm, "reducer_bytes": sum(r["bytes_received"] for r in comm.reducer_stats())}
print(json.dumps({"runs": {name: report(p, reference) for name, p in runs.items()}, **info}))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("mode", ["backend", "hooks"])
@pytest.mark.parametrize("reducers", [0, 2])
def test_ddp_ends_where_ddp_on_gloo_ends(run_ranks, reserve_port, mode, reducers):
    env, reducer_args = {}, []
    if reducers and mode == "backend":  # the hooks meet them at MASTER_PORT+1, torchrun's default
        rendezvous = f"127.0.0.1:{reserve_port()}"
        env, reducer_args = {"COLLECTIVES_RENDEZVOUS": rendezvous}, [f"--rendezvous={rendezvous}"]
    results = run_ranks(DDP_SCRIPT, 3, launcher="torchrun", args=[mode], env=env, reducers=reducers,
                        reducer_args=reducer_args, timeout=180)
    reports = [r.report() for r in results[:3]]
    for report in reports:
        assert report["algorithm"] == ("reduction_server" if reducers else "auto")
        assert (report["reducer_bytes"] > 0) == bool(reducers)
    for name in reports[0]["runs"]:
        runs = [report["runs"][name] for report in reports]
        assert len({run["sha"] for run in runs}) == 1, f"{name}: the ranks' parameters differ"
        if name == "summing_hook":  # the negative control: the check must catch it
            assert not any(run["close"] for run in runs), runs
        elif name.endswith("compress_hook"):  # gradients rounded to 16 bits on the wire
            assert all(run["max_diff"] < 1e-3 for run in runs), (name, runs)
        else:
            assert all(run["close"] for run in runs), (name, runs)
    for result in results[3:]:
        assert result.returncode == 0, result.stderr


# Every ProcessGroup method on the collectives group (made with init_method tcp://) against
# the same call on a gloo group, plus a collectives subgroup and the refusals. Prints the
# failures.
METHODS_SCRIPT = r'''
import json, os, warnings
import torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import collectives.torch

warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's new name, and others
rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("collectives", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=size)
ours, gloo = dist.group.WORLD, dist.new_group(backend="gloo")
failures, checked = [], 0

def data(dtype, n=37, seed=0, low=-3, high=4):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randint(low, high, (n,), generator=g).to(dtype)

def check(name, run, exact=True):
    global checked
    a, b = run(ours), run(gloo)
    for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
        same = torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-6, atol=1e-6)
        if not same:
            failures.append(f"{name}: {x.tolist()[:8]} != gloo's {y.tolist()[:8]}")
    checked += 1

def all_reduce(dtype, op, low=-3, high=4):
    def run(group):
        x = data(dtype, low=low, high=high)
        dist.all_reduce(x, op=op, group=group)
        return x
    return run

for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8):
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX):
        check(f"all_reduce {dtype} {op}", all_reduce(dtype, op))
    check(f"all_reduce {dtype} PRODUCT", all_reduce(dtype, dist.ReduceOp.PRODUCT, low=1, high=3))
check("all_reduce uint8", all_reduce(torch.uint8, dist.ReduceOp.SUM, low=0, high=9))

def average(group):  # gloo has no AVG: its sum, divided
    x = data(torch.float32)
    dist.all_reduce(x, op=dist.ReduceOp.AVG if group is ours else dist.ReduceOp.SUM, group=group)
    return x if group is ours else x / size
check("all_reduce AVG", average, exact=False)

def broadcast(group):
    x = data(torch.int64, seed=rank)
    dist.broadcast(x, src=1, group=group)
    return x
check("broadcast", broadcast)

def all_gather(group):
    out = [torch.empty(37) for _ in range(size)]
    dist.all_gather(out, data(torch.float32), group=group)
    return out
check("all_gather", all_gather)

def all_gather_into_tensor(shape):
    def run(group):  # gloo takes only the concatenated shape
        out = torch.empty(shape if group is ours else (size * 37,))
        dist.all_gather_into_tensor(out, data(torch.float32), group=group)
        return out.view(shape)
    return run
check("all_gather_into_tensor", all_gather_into_tensor((size * 37,)))
check("all_gather_into_tensor stacked", all_gather_into_tensor((size, 37)))

def reduce_scatter_tensor(op):
    def run(group):
        out = torch.empty(5, dtype=torch.int64)
        dist.reduce_scatter_tensor(out, data(torch.int64, n=5 * size), op=op, group=group)
        return out
    return run
check("reduce_scatter_tensor SUM", reduce_scatter_tensor(dist.ReduceOp.SUM))
check("reduce_scatter_tensor MAX", reduce_scatter_tensor(dist.ReduceOp.MAX))

def reduce_scatter(group):
    out = torch.empty(5)
    dist.reduce_scatter(out, list(data(torch.float32, n=5 * size).chunk(size)), group=group)
    return out
check("reduce_scatter", reduce_scatter)

def all_reduce_coalesced(group):
    xs = [data(torch.float32, n=7), data(torch.float32, n=11, seed=1)]
    dist.all_reduce_coalesced(xs, group=group)
    return xs
check("all_reduce_coalesced", all_reduce_coalesced)

def coalescing_manager(group):  # how FSDP and the functional API coalesce
    xs = [data(torch.float32, n=7), data(torch.float32, n=11, seed=1)]
    with dist._coalescing_manager(group=group, async_ops=True) as cm:
        for x in xs:
            dist.all_reduce(x, group=group)
    cm.wait()
    outs = [torch.empty(size * 3), torch.empty(size * 4)]
    with dist._coalescing_manager(group=group, async_ops=True) as cm:
        for out, n in zip(outs, (3, 4)):
            dist.all_gather_into_tensor(out, data(torch.float32, n=n), group=group)
    cm.wait()
    parts = [torch.empty(3), torch.empty(4)]
    with dist._coalescing_manager(group=group, async_ops=True) as cm:
        for part, n in zip(parts, (3, 4)):
            dist.reduce_scatter_tensor(part, data(torch.float32, n=n * size), group=group)
    cm.wait()
    return xs + outs + parts
check("coalesced forms", coalescing_manager)

def functional(group):
    x = data(torch.float32)
    return [funcol.all_reduce(x, "sum", group).wait(), funcol.all_gather_tensor(x, 0, group).wait(),
            funcol.reduce_scatter_tensor(data(torch.float32, n=3 * size), "sum", 0, group).wait()]
check("functional collectives", functional)

def objects(group):
    gathered = [None] * size
    dist.all_gather_object(gathered, {"rank": rank}, group=group)
    sent = [{"from": rank}]
    dist.broadcast_object_list(sent, src=2, group=group)
    return torch.tensor([g["rank"] for g in gathered] + [sent[0]["from"]])
check("all_gather_object, broadcast_object_list", objects)

# issue 13: what gloo has beyond DDP's path
for op in (dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.PRODUCT):
    def reduce(group, op=op):
        x = data(torch.int64, low=1, high=4)
        dist.reduce(x, dst=1, op=op, group=group)
        return x if rank == 1 else torch.zeros(1)
    check(f"reduce {op}", reduce)

def gather(group):
    out = [torch.empty(6, dtype=torch.int32) for _ in range(size)] if rank == 2 else None
    dist.gather(data(torch.int32, n=6), out, dst=2, group=group)
    return out if rank == 2 else [torch.zeros(1)]
check("gather", gather)

def scatter(group):
    out = torch.empty(4)
    dist.scatter(out, [data(torch.float32, n=4, seed=r) for r in range(size)] if rank == 0 else None, src=0, group=group)
    return out
check("scatter", scatter)

def all_to_all(group):  # gloo takes equal sizes only (ours takes uneven ones too)
    outs = [torch.empty(4) for j in range(size)]
    dist.all_to_all(outs, [data(torch.float32, n=4, seed=j) for j in range(size)], group=group)
    return outs
check("all_to_all", all_to_all)

def all_to_all_single(splits):
    def run(group):
        send = [splits(rank, j) for j in range(size)]
        recv = [splits(j, rank) for j in range(size)]
        out = torch.empty(sum(recv), 3, dtype=torch.float64)
        dist.all_to_all_single(out, data(torch.float64, n=3 * sum(send)).view(-1, 3), recv, send, group=group)
        return out
    return run
check("all_to_all_single uneven", all_to_all_single(lambda i, j: (i * 2 + j) % 3))
check("all_to_all_single even", all_to_all_single(lambda i, j: 2))

def send_recv(group):  # tags taken in another order than sent
    right, left = (rank + 1) % size, (rank - 1) % size
    g = [dist.get_global_rank(group, r) for r in (right, left)] if group is not ours else [right, left]
    works = [dist.isend(data(torch.float32, seed=t), g[0], group=group, tag=t) for t in (3, 4)]
    got = [torch.empty(37), torch.empty(37)]
    dist.recv(got[1], g[1], group=group, tag=4)
    dist.recv(got[0], g[1], group=group, tag=3)
    for w in works:
        w.wait()
    return got
check("send/recv with tags", send_recv)

def recv_any_source(group):  # every rank sends rank 0 two messages; it takes them from any source, as they come
    if rank != 0:
        for t in (5, 6):
            dist.send(data(torch.float32, seed=t), 0, group=group, tag=t)
        return torch.zeros(1)
    rows = []
    for _ in range(1, size):
        got = torch.empty(37)
        rows.append([float(dist.recv(got, group=group, tag=5)), *got.tolist()])
        got = torch.empty(37)
        work = dist.irecv(got, group=group, tag=6)
        work.wait()
        rows.append([float(work._source_rank()), *got.tolist()])
    return torch.tensor(sorted(rows))  # senders in arrival order, which differs from run to run
check("recv/irecv from any source", recv_any_source)

def batch(group):
    right, left = (rank + 1) % size, (rank - 1) % size
    got = torch.empty(37)
    ops = [dist.P2POp(dist.isend, data(torch.float32), right, group=group), dist.P2POp(dist.irecv, got, left, group=group)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return got
check("batch_isend_irecv", batch)

for op in (dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.PRODUCT):
    def int16(group, op=op):  # gloo reduces no int16: int32 there, wrapped back into int16
        x = data(torch.int64, low=-300, high=300).to(torch.int16 if group is ours else torch.int32)
        dist.all_reduce(x, op=op, group=group)
        return x.to(torch.int16)
    check(f"all_reduce int16 {op}", int16)
for op, as_uint8 in ((dist.ReduceOp.SUM, dist.ReduceOp.MAX), (dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN),
                     (dist.ReduceOp.MIN, dist.ReduceOp.MIN), (dist.ReduceOp.MAX, dist.ReduceOp.MAX)):
    def logical(group, op=op, as_uint8=as_uint8):  # gloo has no bool: or/and on 0/1 bytes there
        x = data(torch.int64, low=0, high=2).to(torch.bool if group is ours else torch.uint8)
        dist.all_reduce(x, op=op if group is ours else as_uint8, group=group)
        return x.to(torch.bool)
    check(f"all_reduce bool {op}", logical)

def complex_sum(group):
    x = torch.complex(data(torch.float32), data(torch.float32, seed=5))
    dist.all_reduce(x, group=group)
    return torch.view_as_real(x)
check("all_reduce complex64", complex_sum)

def moved_dtypes(group):
    outs = []
    for dtype in (torch.bool, torch.int16, torch.complex128):
        x = data(torch.int64, low=0, high=2).to(dtype)
        gathered = [torch.empty(37, dtype=dtype) for _ in range(size)]
        wire = (lambda t: t) if group is ours else (lambda t: t.view(torch.uint8))  # gloo takes their bytes only
        dist.broadcast(wire(x), src=2, group=group)
        dist.all_gather([wire(g) for g in gathered], wire(x), group=group)
        outs += [x, *gathered]
    return [torch.view_as_real(o) if o.is_complex() else o for o in outs]
check("broadcast and all_gather of bool, int16, complex128", moved_dtypes)

def transposed(group):
    x = data(torch.float32, n=35).view(5, 7).t()
    dist.all_reduce(x, group=group)
    return x
check("all_reduce of a transposed tensor", transposed)
y = torch.zeros(7, 10)[:, ::2]
if rank == 0:
    y.copy_(torch.arange(35.0).view(7, 5))
dist.broadcast(y, src=0)
if not torch.equal(y, torch.arange(35.0).view(7, 5)):
    failures.append(f"broadcast into a strided tensor: {y.tolist()}")

def sparse(group):
    i = torch.tensor([[rank, 2], [0, rank]])
    x = torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (4, 4))
    dist.all_reduce(x, group=group)
    return x.to_dense()
check("sparse all_reduce", sparse)

dist.barrier(group=ours)
sub = dist.new_group(ranks=[0, 2], backend="collectives")
if rank in (0, 2):
    x = torch.full((9,), float(rank + 1))
    dist.all_reduce(x, group=sub)
    if not torch.equal(x, torch.full((9,), 4.0)) or dist.get_world_size(sub) != 2:
        failures.append(f"subgroup of ranks 0 and 2: {x.tolist()}")
    checked += 1

def refused(name, call, error, words):
    global checked
    try:
        call()
        failures.append(f"{name} did not raise")
    except error as e:
        if not all(w in str(e) for w in words):
            failures.append(f"{name}: {type(e).__name__}: {e}")
    checked += 1

refused("BAND", lambda: dist.all_reduce(torch.ones(4, dtype=torch.int64), op=dist.ReduceOp.BAND),
        NotImplementedError, ["BAND", "SUM"])
refused("a meta tensor", lambda: dist.all_reduce(torch.empty(4, device="meta")), TypeError, ["meta", "CPU"])
refused("a short output", lambda: dist.all_gather_into_tensor(torch.empty(3), torch.ones(4)), ValueError,
        ["all_gather_into_tensor", "expected 12"])
dist.destroy_process_group(gloo)
del gloo  # its threads end here, not while the interpreter finalizes (one that frees a tensor then aborts)
dist.barrier()
print(json.dumps({"rank": rank, "failures": failures, "checked": checked}))
dist.destroy_process_group()
'''


def test_every_method_matches_gloo(run_ranks):
    for result in run_ranks(METHODS_SCRIPT, 3, launcher="torchrun", timeout=180):
        report = result.report()
        assert report["failures"] == [], report["failures"]
        assert report["checked"] >= 68


# Rank 1 joins late: rank 0's async all-reduce returns at once, not done, and its future
# completes (value: the tensors) when rank 1 has joined; then many back to back.
ASYNC_SCRIPT = r'''
import json, os, time
import torch, torch.distributed as dist
import collectives.torch

dist.init_process_group("collectives")
rank = dist.get_rank()
if rank == 1:
    time.sleep(1.5)
x = torch.full((1000,), float(rank + 1))
started = time.monotonic()
work = dist.all_reduce(x, async_op=True)
issued_s, done_at_issue = time.monotonic() - started, work.is_completed()
doubled = work.get_future().then(lambda f: f.value()[0] * 2).wait()
waited_s = time.monotonic() - started
xs = [torch.full((100_000,), float(rank + i)) for i in range(8)]
works = [dist.all_reduce(t, async_op=True) for t in xs]
values = torch.futures.collect_all([w.get_future() for w in works]).wait()
many_ok = all(torch.equal(v.value()[0], torch.full((100_000,), float(1 + 2 * i))) for i, v in enumerate(values))
value_ok = torch.equal(doubled, torch.full((1000,), 6.0)) and torch.equal(x, torch.full((1000,), 3.0))
print(json.dumps({"rank": rank, "issued_s": issued_s, "done_at_issue": done_at_issue, "waited_s": waited_s,
                  "value_ok": value_ok, "many_ok": many_ok, "all_completed": all(w.is_completed() for w in works)}))
dist.destroy_process_group()
'''


def test_async_work_returns_at_once_and_its_future_completes(run_ranks):
    reports = [r.report() for r in run_ranks(ASYNC_SCRIPT, 2, launcher="torchrun", timeout=120)]
    for report in reports:
        assert report["value_ok"] and report["many_ok"] and report["all_completed"], report
    early = reports[0]
    assert early["issued_s"] < 0.5 and not early["done_at_issue"], early
    assert early["waited_s"] > 1.0, early


# DDP on 3 ranks; rank 1 raises at step 3. The others must raise too, naming the cause.
FAILING_RANK_SCRIPT = r'''
import datetime, json, sys
import torch, torch.distributed as dist, torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
import collectives.torch

dist.init_process_group("collectives", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
model = DDP(nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 8)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
try:
    for step in range(1000):
        if rank == 1 and step == 3:
            raise RuntimeError("rank 1 fails on purpose")
        opt.zero_grad()
        model(torch.randn(16, 32)).sum().backward()
        opt.step()
except Exception as e:
    print(json.dumps({"rank": rank, "step": step, "error": f"{type(e).__name__}: {e}"}))
    sys.exit(1)
print(json.dumps({"rank": rank, "step": step}))
'''


def test_a_rank_that_raises_mid_training_makes_the_others_raise(run_ranks):
    results = run_ranks(FAILING_RANK_SCRIPT, 3, launcher="torchrun", timeout=120)
    for result in results:
        report = result.report()
        assert result.returncode == 1 and "error" in report, report
        assert report["step"] <= 4, report  # no rank trained on alone
    for result in (results[0], results[2]):
        assert "rank 1" in result.report()["error"], result.report()


# 20 cycles of init_process_group (file://) + a subgroup + collectives + destroy: the
# threads, file descriptors and sockets after the last equal those after the first.
CYCLES_SCRIPT = r'''
import gc, json, os, sys, threading
import torch, torch.distributed as dist
import collectives.torch

rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

def target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the listing's own fd, closed since
        return ""

def resources():
    gc.collect()
    fds = os.listdir("/proc/self/fd")
    sockets = sum(1 for fd in fds if target(fd).startswith("socket:"))
    return {"threads": threading.active_count(), "native_threads": len(os.listdir("/proc/self/task")),
            "fds": len(fds), "sockets": sockets,
            "ours": sorted(t.name for t in threading.enumerate() if t.name.startswith("collectives"))}

seen = []
for cycle in range(20):
    dist.init_process_group("collectives", init_method=f"file://{sys.argv[1]}/store{cycle}", rank=rank,
                            world_size=size)
    sub = dist.new_group(backend="collectives")
    x = torch.ones(1000)
    dist.all_reduce(x)
    dist.all_reduce(x, group=sub)
    dist.barrier()
    ok = torch.equal(x, torch.full((1000,), float(size * size)))
    dist.destroy_process_group()
    seen.append(dict(resources(), ok=ok))
print(json.dumps({"rank": rank, "first": seen[0], "last": seen[-1], "all_ok": all(s["ok"] for s in seen)}))
'''


def test_destroy_process_group_frees_everything(run_ranks, tmp_path):
    for result in run_ranks(CYCLES_SCRIPT, 2, launcher="torchrun", args=[str(tmp_path)], timeout=200):
        report = result.report()
        assert report["all_ok"], report
        assert report["last"] == report["first"], report
        assert report["last"]["ours"] == [], report


# collectives.torch.init_process_group() under mpirun, here an MPMD job with a reducer: DDP
# ends where DDP on a gloo subgroup ends.
MPI_SCRIPT = r'''
import json
import torch, torch.distributed as dist, torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
import collectives.torch

collectives.torch.init_process_group()
rank, size = dist.get_rank(), dist.get_world_size()

def batch(step, rank):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + rank))

def train(ddp):
    """DDP's steps, or (ddp=False) the same steps in this one process: the gradient of
    every rank's batch, averaged, as DDP averages them."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    step_model = DDP(model) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        opt.zero_grad()
        ranks = [rank] if ddp else range(size)
        (sum(step_model(batch(step, r)).sum() for r in ranks) / len(ranks)).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

close = torch.allclose(train(ddp=True), train(ddp=False), rtol=1e-5, atol=1e-6)
print(json.dumps({"rank": rank, "size": size, "close": close,
                  "algorithm": dist.group.WORLD.communicator.algorithm}))
dist.destroy_process_group()
'''


@pytest.mark.mpi
def test_init_process_group_under_mpirun_with_a_reducer(run_mpirun):
    result = run_mpirun(MPI_SCRIPT, 2, reducers=1, timeout=120)
    reports = result.reports()
    assert result.returncode == 0 and len(reports) == 2, result.stderr[-3000:]
    for report in reports:
        assert report["size"] == 2 and report["close"] and report["algorithm"] == "reduction_server", report


# One process each: the settings that are refused before anything is sent.
REFUSALS_SCRIPT = r'''
import json, os, sys, tempfile
import torch.distributed as dist
import collectives.torch

def refused(**env):
    os.environ.update(env)
    try:
        dist.init_process_group("collectives", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=2)
    except ValueError as e:
        return str(e)
    return "accepted"

print(json.dumps({"no_token_with_reducers": refused(COLLECTIVES_RENDEZVOUS="127.0.0.1:1", COLLECTIVES_NUM_REDUCERS="1"),
                  "no_rendezvous": refused(COLLECTIVES_TOKEN="t", COLLECTIVES_RENDEZVOUS="")}))
'''


def test_missing_settings_are_refused_with_what_to_set(run_ranks):
    report = run_ranks(REFUSALS_SCRIPT, 1, launcher=None, timeout=60)[0].report()
    assert "COLLECTIVES_TOKEN" in report["no_token_with_reducers"], report
    assert "COLLECTIVES_RENDEZVOUS" in report["no_rendezvous"], report


# torchrun and nothing else: no COLLECTIVES_TOKEN, no `import collectives.torch` (torch autoloads the
# backend); the secret goes through torch's store, said once in the log.
NOTHING_SET_SCRIPT = r'''
import json, logging, os
import torch, torch.distributed as dist
logging.basicConfig(level=logging.INFO)
dist.init_process_group("collectives")
sub = dist.new_group([0, 1])
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
rows = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(rows, flat)
print(json.dumps({"equal": all(torch.equal(r, flat) for r in rows), "token": "COLLECTIVES_TOKEN" in os.environ}))
dist.destroy_process_group()
'''


def test_torchrun_with_nothing_set_trains(run_ranks):
    results = run_ranks(NOTHING_SET_SCRIPT, 3, launcher="torchrun", env={"COLLECTIVES_TOKEN": None}, timeout=120)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.report() == {"equal": True, "token": False}
        assert result.stderr.count("shared through the torch.distributed store") == 1, result.stderr[-3000:]


# 2 * world_size groups by dist.new_group: each over the world's connections (comm.create_group),
# so the process holds no more file descriptors (sockets, shared memory) after making them all.
MANY_GROUPS_SCRIPT = r'''
import itertools, json, os
import torch, torch.distributed as dist
dist.init_process_group("collectives")
rank, n = dist.get_rank(), dist.get_world_size()
dist.all_reduce(torch.ones(1))
fds = len(os.listdir("/proc/self/fd"))
lists = [list(pair) for pair in itertools.combinations(range(n), 2)] + [list(range(n)), [2, 0], [1, 2, 0]]
failures = []
for ranks in lists:
    group = dist.new_group(ranks)  # every rank calls it, members or not (as torch asks)
    if rank in ranks:
        x = torch.full((5,), float(rank + 1))
        dist.all_reduce(x, group=group)
        if not torch.equal(x, torch.full((5,), float(sum(r + 1 for r in ranks)))):
            failures.append(f"{ranks}: {x.tolist()}")
        if dist.get_rank(group) != sorted(ranks).index(rank):  # torch orders a group's ranks
            failures.append(f"{ranks}: group rank {dist.get_rank(group)}")
print(json.dumps({"groups": len(lists), "failures": failures, "new_fds": len(os.listdir("/proc/self/fd")) - fds}))
dist.destroy_process_group()
'''


def test_many_new_groups_open_no_connection(run_ranks):
    for result in run_ranks(MANY_GROUPS_SCRIPT, 3, launcher="torchrun", timeout=120):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.report() == {"groups": 6, "failures": [], "new_fds": 0}, result.stderr[-3000:]


# cc.init() under torchrun with no COLLECTIVES_TOKEN, twice (the second communicator takes the
# secret the first one put in torchrun's store), and without importing torch itself.
CC_INIT_NOTHING_SET_SCRIPT = r'''
import json, logging, sys
import numpy as np
import collectives as cc
logging.basicConfig(level=logging.INFO)
sums = []
for _ in range(2):
    with cc.init() as comm:
        sums.append(int(comm.allreduce(np.array([comm.rank + 1], np.int64))[0]))
print(json.dumps({"sums": sums, "size": comm.size}))
'''


def test_cc_init_under_torchrun_with_nothing_set(run_ranks):
    results = run_ranks(CC_INIT_NOTHING_SET_SCRIPT, 3, launcher="torchrun", env={"COLLECTIVES_TOKEN": None},
                        timeout=120)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.report() == {"sums": [6, 6], "size": 3}
        assert result.stderr.count("shared through the torch.distributed store") == 1, result.stderr[-3000:]


def test_cc_init_under_torchrun_without_its_store_or_with_reducers_asks_for_a_token(run_ranks):
    # Without the agent's store (RANK/WORLD_SIZE set by hand) nothing can carry the secret; reducers
    # started on their own need the token too.
    for env, expected in (({"COLLECTIVES_TOKEN": None, "TORCHELASTIC_USE_AGENT_STORE": None}, "COLLECTIVES_TOKEN"),
                          ({"COLLECTIVES_TOKEN": None, "COLLECTIVES_NUM_REDUCERS": "1"}, "reducers")):
        results = run_ranks(CC_INIT_NOTHING_SET_SCRIPT, 2, launcher="torchrun", env=env, timeout=60)
        for result in results:
            assert result.returncode != 0 and expected in result.stderr, result.stderr[-3000:]


def test_import_registers_the_backend_for_the_cpu():
    assert "collectives" in dist.Backend.backend_list
    devices = dist.Backend.backend_capability["collectives"]
    assert devices == (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error path of a machine without CUDA")
def test_device_tensors_without_cuda_are_refused_naming_the_device():
    group = cctorch.ProcessGroup(cc.init(rank=0, size=1))
    try:
        with pytest.raises(TypeError, match="meta.*move it to the CPU"):
            group.allreduce([torch.empty(4, device="meta")])
        with pytest.raises(TypeError, match="meta"):
            group.allgather([[torch.empty(4)]], [torch.empty(4, device="meta")])
    finally:
        group.shutdown()


def test_a_group_over_a_given_communicator_and_hooks_in_one_process():
    comm = cc.init(rank=0, size=1)
    group = cctorch.ProcessGroup(comm)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2), process_group=group)
        model.register_comm_hook(comm, cctorch.hooks.bf16_compress_hook)  # DDP refuses torch's own here
        model(torch.ones(3, 4)).sum().backward()
        assert torch.allclose(model.module.bias.grad, torch.full((2,), 3.0))
        assert group.name() == "collectives" and (group.rank(), group.size()) == (0, 1)
    finally:
        group.shutdown()
    assert "closed" in repr(comm)  # the group owned it
    with pytest.raises(cc.CollectiveError, match="closed"):
        group.allreduce([torch.ones(1)])


def test_error_feedback_keeps_what_fp16_rounds_away():
    # A gradient of 1 + 1e-4 on every step: float16 (spacing 2**-10 near 1) rounds it to 1, so
    # fp16_compress_hook loses 1e-4 each step; with error feedback what the wire got over the
    # steps is the true sum to within one rounding (half a float16 spacing).
    steps, gradient = 10, 1.0 + 1e-4

    def applied(hook, state_of):
        comm = cc.init(rank=0, size=1)
        group = cctorch.ProcessGroup(comm)
        try:
            layer = torch.nn.Linear(4, 1, bias=False)
            torch.nn.init.zeros_(layer.weight)
            model = torch.nn.parallel.DistributedDataParallel(layer, process_group=group)
            model.register_comm_hook(state_of(comm), hook)
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
            for _ in range(steps):
                opt.zero_grad()
                model(torch.full((1, 4), gradient)).sum().backward()
                opt.step()
            return -layer.weight.detach()
        finally:
            group.shutdown()

    exact = torch.full((1, 4), steps * gradient)
    plain = applied(cctorch.hooks.fp16_compress_hook, lambda comm: comm)
    fed_back = applied(cctorch.hooks.error_feedback_hook, cctorch.hooks.ErrorFeedback)
    assert (plain - exact).abs().max() > 9e-4, plain  # the control: ten losses of 1e-4
    assert (fed_back - exact).abs().max() < 2**-11 + 1e-6, fed_back
    with cc.init(rank=0, size=1) as comm, pytest.raises(TypeError, match="float16 or bfloat16"):
        cctorch.hooks.ErrorFeedback(comm, torch.float32)


def test_empty_tensors_are_gathered():
    # torch's new_empty((size, 0)) has strides that are not row-major: with no elements, that is no matter.
    with cc.init(rank=0, size=1) as comm:
        assert comm.allgather(torch.empty(0)).shape == (1, 0)
        assert comm.allgather(torch.empty(2, 0)).shape == (1, 2, 0)


def test_ops_are_async_profiler_events_as_gloos():
    # PyTorch's suite looks for these on gloo ("gloo:all_reduce", ...): one async event per op,
    # named after the group's backend, with the shapes of its inputs.
    group = cctorch.ProcessGroup(cc.init(rank=0, size=1))
    try:
        x = torch.ones(4, 3)
        with torch.autograd.profiler.profile(record_shapes=True) as prof:
            group.allreduce([x]).wait()
            group.broadcast([x]).wait()
            group.allgather([[torch.empty(4, 3)]], [x]).wait()
        events = [(e.name, e.is_async, e.count, e.input_shapes) for e in prof.function_events
                  if e.name.startswith("collectives:")]
        assert events == [(f"collectives:{op}", True, 1, [[4, 3]]) for op in ("all_reduce", "broadcast", "all_gather")]
        group.allreduce([x]).wait()  # no profiler: no event, and nothing left open
    finally:
        group.shutdown()
