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

__all__ = ["allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "ErrorFeedback", "error_feedback_hook"]

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


class ErrorFeedback:
    """The state of :func:`error_feedback_hook`: the communicator, the dtype on the wire
    (float16 or bfloat16), and per bucket what rounding to it lost at the last step, which
    the bucket's next gradients get back (error feedback): rounding errors then do not add up
    over steps, as they do with fp16_compress_hook, at the cost of one float32 copy of the
    gradients per process.

        model.register_comm_hook(ErrorFeedback(comm), error_feedback_hook)
    """

    def __init__(self, comm: cc.Communicator, dtype: torch.dtype = torch.float16):
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"ErrorFeedback sends float16 or bfloat16, not {dtype}")
        self.comm = comm
        self.dtype = dtype
        self._residuals: dict = {}  # bucket index -> what rounding lost, in the bucket's dtype

    def compress(self, bucket: dist.GradBucket) -> torch.Tensor:
        """The bucket's gradients, divided by the size, plus last step's residual, rounded to
        the wire's dtype; keeps what that rounding loses for the next step."""
        buffer = bucket.buffer()
        corrected = buffer.div(self.comm.size)
        residual = self._residuals.get(bucket.index())
        # DDP rebuilds its buckets after the first step: a bucket of another size starts afresh.
        if residual is not None and residual.shape == corrected.shape:
            corrected.add_(residual)
        compressed = corrected.to(self.dtype)
        self._residuals[bucket.index()] = corrected.sub_(compressed.to(corrected.dtype))
        return compressed


def error_feedback_hook(state: ErrorFeedback, bucket: dist.GradBucket) -> Future:
    """As fp16_compress_hook (or bf16, by the state's dtype), with error feedback: see
    :class:`ErrorFeedback`."""
    return _reduced_into(state.comm, bucket.buffer(), state.compress(bucket))


def _compressed(comm: cc.Communicator, bucket: dist.GradBucket, dtype: torch.dtype) -> Future:
    buffer = bucket.buffer()
    # Divided first, as torch's own compression hooks do, so that the sum cannot overflow.
    return _reduced_into(comm, buffer, buffer.to(dtype).div_(comm.size))


def _reduced_into(comm: cc.Communicator, buffer: torch.Tensor, compressed: torch.Tensor) -> Future:
    """Completed with ``buffer`` once it holds the sum over comm's workers of ``compressed``."""
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
