"""Checks the CUDA path on a machine with a GPU (run it there by hand; it needs cupy or torch
with CUDA, and the installed collectives built where nvcc was found):

    python tests/gpu/check_cuda.py            # the kernels against the CPU's, then 2 ranks

1. The device kernels (_core.cuda.reduce_into) against the CPU kernels, bit for bit, for
   float32, float16 and bfloat16 with sum, min, max and prod, NaNs and ties included; the CPU
   kernels are the ones tests/python/test_kernels.py checks against numpy.
2. A 2-rank all-reduce of cupy arrays and of torch CUDA tensors (each rank a process, both on
   device 0 or on devices 0 and 1), against numpy.
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
import json, os, sys
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
comm.close()
print(json.dumps(results), flush=True)
"""


def check_allreduce(kind: str) -> None:
    try:
        __import__(kind)
    except ImportError:
        print(f"2-rank all-reduce of {kind} buffers: skipped ({kind} is not installed)")
        return
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "rank.py")
        with open(script, "w") as f:
            f.write(RANK_SCRIPT)
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, script, kind], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "COLLECTIVES_RANK": str(r), "COLLECTIVES_SIZE": "2",
                                       "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}",
                                       "COLLECTIVES_TOKEN": "gpu-check-token-0123456789abcdef"}) for r in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        results = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 and out.strip() else None
        print(f"2-rank all-reduce of {kind} buffers, rank {rank}: {results if results else 'FAILED (rc %d)' % proc.returncode}")
        if not results or not all(results.values()):
            sys.exit(1)


if __name__ == "__main__":
    if not _core.cuda.BUILT:
        sys.exit("this collectives was built without the CUDA kernels (no nvcc when it was built)")
    print(f"CUDA runtime {_core.cuda.runtime_version()}, {_core.cuda.devices()} GPU(s)")
    if _core.cuda.devices() == 0:
        sys.exit("no GPU visible")
    check_kernels()
    check_allreduce("cupy")
    check_allreduce("torch")
