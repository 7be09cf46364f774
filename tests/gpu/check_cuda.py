"""Checks the CUDA path on a machine with a GPU (run it there by hand; it needs cupy or torch
with CUDA, and the installed collectives built where nvcc was found):

    python tests/gpu/check_cuda.py            # the kernels against the CPU's, then 2 ranks

1. The device kernels (_core.cuda.reduce_into) against the CPU kernels, bit for bit, for
   float32, float16 and bfloat16 with sum, min, max and prod, NaNs and ties included; the CPU
   kernels are the ones tests/python/test_kernels.py checks against numpy.
2. A 2-rank all-reduce of cupy arrays and of torch CUDA tensors (each rank a process, both on
   device 0 or on devices 0 and 1), against numpy: buffers of several 4 MiB pieces (the CUDA
   copy engine of csrc/staging/ and kernels/cuda/cuda_copy_engine.cu: pinned slots, a stream,
   events), several allreduce_async calls in flight at once (each returns before its copies are
   done), and, with torch, DDP over CUDA parameters with small buckets through the torch backend
   (the copy of bucket k+1 overlaps the all-reduce of bucket k), against the average of both
   ranks' gradients computed on the CPU. It prints the time of a staged 64 MiB all-reduce beside
   a whole-buffer copy, all-reduce and copy back measured in the same run (for RESULTS.md).
Prints one line per check and exits non-zero on the first failure.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import ml_dtypes

from collectives import _core

DTYPES = ("float32", "float16", "bfloat16")
OPS = ("sum", "min", "max", "prod")
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def device_module():
    try:
        import cupy
        return "cupy", cupy
    except ImportError:
        import torch
        return "torch", torch


def check_kernels() -> None:
    kind, lib = device_module()
    rng = np.random.default_rng(7)
    count = 1 << 20 | 5  # many blocks of the grid-stride loop, and a ragged end
    for dtype in DTYPES:
        for op in OPS:
            a = rng.uniform(-2, 2, count).astype(np.float32)
            b = rng.uniform(-2, 2, count).astype(np.float32)
            a[:3], b[:3] = [np.nan, 1, 0.0], [2, np.nan, -0.0]  # the NaN rule, a signed-zero tie
            a, b = a.astype(NUMPY[dtype]), b.astype(NUMPY[dtype])
            expected = a.copy()
            _core.kernels.reduce_into(expected.ctypes.data, b.ctypes.data, count, dtype, op, "scalar")
            bits = np.int32 if dtype == "float32" else np.int16  # the device sees raw elements
            raw_a, raw_b = a.view(bits), b.view(bits)
            if kind == "cupy":
                da, db = lib.asarray(raw_a), lib.asarray(raw_b)
                pa, pb = da.data.ptr, db.data.ptr
            else:
                da, db = lib.from_numpy(raw_a).cuda(), lib.from_numpy(raw_b).cuda()
                pa, pb = da.data_ptr(), db.data_ptr()
            _core.cuda.reduce_into(pa, pb, count, _core.DTYPES.index(dtype), _core.OPS.index(op))
            got = (lib.asnumpy(da) if kind == "cupy" else da.cpu().numpy()).view(raw_a.dtype)
            same = np.array_equal(got, expected.view(raw_a.dtype))
            print(f"kernel {dtype:>8} {op:<4} ({kind}): {'bit-identical to the CPU' if same else 'DIFFERS'}")
            if not same:
                sys.exit(1)


RANK_SCRIPT = r"""
import json, os, sys, time
import numpy as np
import collectives as cc
kind = sys.argv[1]
comm = cc.init()
rank, size = comm.rank, comm.size
n = 3 << 20
results = {}
if kind == "cupy":
    import cupy as lib
    devices = lib.cuda.runtime.getDeviceCount()
    lib.cuda.Device(rank % devices).use()
    for dtype in ("float32", "float16"):
        x = lib.arange(n, dtype=dtype) % 7 + rank
        comm.allreduce(x)
        expected = sum((np.arange(n) % 7 + r) for r in range(size)).astype(dtype)
        results[dtype] = bool((lib.asnumpy(x) == expected).all())
else:
    import torch
    device = torch.device("cuda", rank % torch.cuda.device_count())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.arange(n, device=device) % 7 + rank).to(dtype)
        comm.allreduce(x)
        expected = sum((torch.arange(n) % 7 + r) for r in range(size)).to(dtype)
        results[str(dtype)] = bool(torch.equal(x.cpu(), expected))
    # Several calls in flight, of several pieces each and a ragged end, beside a host one.
    sizes = (1, (5 << 20) + 3, 9 << 20, 1000)
    xs = [torch.arange(m, device=device, dtype=torch.float32) % 5 + rank for m in sizes]
    host = np.full(1000, rank, np.float32)
    works = [comm.allreduce_async(x) for x in xs] + [comm.allreduce_async(host)]
    results["async returns before the copies"] = not all(w.done() for w in works)
    for w in works:
        w.wait()
    results["async results"] = all(torch.equal(x.cpu(), sum(torch.arange(m, dtype=torch.float32) % 5 + r
                                                            for r in range(size)))
                                   for x, m in zip(xs, sizes)) and bool((host == sum(range(size))).all())
    # Staged against copying the whole buffer, all-reducing it and copying it back (the way before).
    x = torch.ones(16 << 20, device=device)
    comm.allreduce(x)
    torch.cuda.synchronize()
    comm.barrier()
    start = time.perf_counter()
    for _ in range(5):
        comm.allreduce(x)
    staged = (time.perf_counter() - start) / 5
    pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    comm.barrier()
    start = time.perf_counter()
    for _ in range(5):
        pinned.copy_(x)
        comm.allreduce(pinned.numpy())
        x.copy_(pinned)
        torch.cuda.synchronize()
    whole = (time.perf_counter() - start) / 5
    results["timing"] = f"64 MiB all-reduce: staged {staged * 1e3:.1f} ms, whole-buffer copies {whole * 1e3:.1f} ms"
comm.close()
print(json.dumps(results), flush=True)
"""


def run_two_ranks(what: str, script_text: str, args: list, env_of_rank) -> None:
    """Runs script_text as 2 processes (env_of_rank(rank, port): their variables, port a free
    one on 127.0.0.1) and checks the JSON object each prints last: every value true."""
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "rank.py")
        with open(script, "w") as f:
            f.write(script_text)
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **env_of_rank(r, port)}) for r in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        results = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 and out.strip() else None
        print(f"{what}, rank {rank}: {results if results else 'FAILED (rc %d)' % proc.returncode}")
        if not results or not all(results.values()):
            sys.exit(1)


def check_allreduce(kind: str) -> None:
    try:
        __import__(kind)
    except ImportError:
        print(f"2-rank all-reduce of {kind} buffers: skipped ({kind} is not installed)")
        return
    run_two_ranks(f"2-rank all-reduce of {kind} buffers", RANK_SCRIPT, [kind],
                  lambda r, port: {"COLLECTIVES_RANK": str(r), "COLLECTIVES_SIZE": "2",
                                   "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}",
                                   "COLLECTIVES_TOKEN": "gpu-check-token-0123456789abcdef"})


DDP_SCRIPT = r"""
import copy, json, os, sys
import torch
import torch.distributed as dist
import collectives.torch  # noqa: F401  (the backend)

rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("collectives", rank=rank, world_size=size)
device = torch.device("cuda", rank % torch.cuda.device_count())
torch.manual_seed(0)
cpu_model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                torch.nn.ReLU(), torch.nn.Linear(1024, 16))
model = torch.nn.parallel.DistributedDataParallel(
    copy.deepcopy(cpu_model).to(device),
    device_ids=[device.index], bucket_cap_mb=1)  # several buckets: bucket k+1's copy overlaps bucket k
def batch(r):
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(32, 1024, generator=g)
model(batch(rank).to(device)).square().sum().backward()
# The expected gradient: the average over the ranks of each one's, on the CPU.
expected = [torch.zeros_like(p) for p in cpu_model.parameters()]
for r in range(size):
    cpu_model.zero_grad()
    cpu_model(batch(r)).square().sum().backward()
    for e, p in zip(expected, cpu_model.parameters()):
        e += p.grad / size
close = all(torch.allclose(p.grad.cpu(), e, rtol=1e-4, atol=1e-5) for p, e in zip(model.parameters(), expected))
dist.destroy_process_group()
print(json.dumps({"ddp gradients": close}), flush=True)
"""


def check_ddp() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("DDP over CUDA tensors: skipped (torch is not installed)")
        return
    run_two_ranks("DDP over CUDA tensors", DDP_SCRIPT, [],
                  lambda r, port: {"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "COLLECTIVES_TOKEN": "gpu-check-token-0123456789abcdef"})


if __name__ == "__main__":
    if not _core.cuda.BUILT:
        sys.exit("this collectives was built without the CUDA kernels (no nvcc when it was built)")
    print(f"CUDA runtime {_core.cuda.runtime_version()}, {_core.cuda.devices()} GPU(s)")
    if _core.cuda.devices() == 0:
        sys.exit("no GPU visible")
    check_kernels()
    check_allreduce("cupy")
    check_allreduce("torch")
    check_ddp()
