"""DDP communication hooks that send the gradient buckets through collectives (ring, or
reducers) while the rest of the job stays on its own backend (NCCL, gloo):

    comm = collectives.init()
    model = DistributedDataParallel(model)                  # on any process group
    model.register_comm_hook(comm, collectives.torch.hooks.allreduce_hook)

Each hook returns at once with a Future that a thread completes when the bucket's all-reduce is
done, so communication overlaps the rest of the backward pass. CUDA buckets are staged through
pinned host memory.
"""

import threading
import weakref

import torch
import torch.distributed as dist

import collectives as cc

from ._work import Completer, chained, in_place

__all__ = ["allreduce_hook", "fp16_compress_hook", "bf16_compress_hook"]

# DDP checks a hook's annotations against these very objects (not strings).
Future = torch.futures.Future[torch.Tensor]

_completers: "weakref.WeakKeyDictionary[cc.Communicator, Completer]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def allreduce_hook(comm: cc.Communicator, bucket: dist.GradBucket) -> Future:
    """Averages the bucket's gradients over comm's workers, as DDP does by default."""
    buffer = bucket.buffer()
    return chained(_future(comm, buffer, "avg"))


def fp16_compress_hook(comm: cc.Communicator, bucket: dist.GradBucket) -> Future:
    """As allreduce_hook, with the gradients sent as float16: half the bytes on the wire
    (reducers sum them in float32)."""
    return _compressed(comm, bucket, torch.float16)


def bf16_compress_hook(comm: cc.Communicator, bucket: dist.GradBucket) -> Future:
    """As allreduce_hook, with the gradients sent as bfloat16 (reducers sum them in float32)."""
    return _compressed(comm, bucket, torch.bfloat16)


# DDP refuses a hook of this name unless NCCL can reduce bfloat16; this one needs no NCCL.
bf16_compress_hook.__name__ = "collectives_bf16_compress_hook"


def _compressed(comm: cc.Communicator, bucket: dist.GradBucket, dtype: torch.dtype) -> Future:
    buffer = bucket.buffer()
    # Divided first, as torch's own compression hooks do, so that the sum cannot overflow.
    compressed = buffer.to(dtype).div_(comm.size)
    # then(): errors reach DDP as errors (see chained)
    return _future(comm, compressed, "sum").then(lambda done: buffer.copy_(done.value()))


def _future(comm: cc.Communicator, tensor: torch.Tensor, op: str) -> Future:
    """Completed with ``tensor`` once it is all-reduced in place."""
    step = in_place(tensor, op, "allreduce", comm.allreduce_async)
    return _completer(comm).future([step], tensor)


def _completer(comm: cc.Communicator) -> Completer:
    """The thread that completes comm's hook futures; it ends when comm is collected."""
    with _lock:
        completer = _completers.get(comm)
        if completer is None:
            completer = _completers[comm] = Completer(f"collectives-hooks-rank{comm.rank}")
            weakref.finalize(comm, completer.close)
        return completer
