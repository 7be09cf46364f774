"""From collectives' Work objects to torch's: futures completed by a thread of their own once
the core has finished a collective, point-to-point messages waited on by themselves, and
tensors staged where and as the core can take them (host memory, contiguous, a dtype the core
has)."""

from __future__ import annotations

import datetime
import functools
import queue
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

import collectives as cc
import collectives.info

# One collective: the core's Work, and what to do with its result once it is done (copy it
# into the caller's tensors), or None.
Step = Tuple[cc.Work, Optional[Callable[[Any], Any]]]
# What to call once an op is done, before anyone learns it is (ends its profiler event), or None.
Ending = Optional[Callable[[], None]]


class Completer:
    """A thread that completes torch Futures as the collectives they stand for finish, in the
    order they were started (the order in which every rank issues them). The caller goes on
    at once: DDP starts a bucket's all-reduce and goes on with the backward pass."""

    def __init__(self, name: str):
        self._queue: "queue.SimpleQueue[Optional[Tuple[List[Step], torch.futures.Future, Any, Ending]]]" = \
            queue.SimpleQueue()
        self._closed = False
        # A daemon: a job that never destroys its process group must still be able to exit.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def future(self, steps: List[Step], result: Any, ending: Ending = None) -> torch.futures.Future:
        """A Future that gets ``result`` once every step is done, or the first step's error
        (hand torch's C++ side, DDP, :func:`chained` futures instead); ``ending`` is called
        just before."""
        if self._closed:
            raise cc.CollectiveError("this process group is shut down: create a new one")
        future: torch.futures.Future = torch.futures.Future()
        self._queue.put((steps, future, result, ending))
        return future

    def close(self) -> None:
        """Completes what was queued (close the communicator first, so that it fails fast),
        then ends the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            steps, future, result, ending = item
            del item
            complete(steps, future, result, ending)
            del steps, future, result, ending


def complete(steps: List[Step], future: torch.futures.Future, result: Any, ending: Ending = None) -> None:
    """Waits for every step, runs its finish, calls ``ending``, and completes ``future`` with
    ``result`` or the first error."""
    error: Optional[BaseException] = None
    for work, finish in steps:
        try:
            value = work.wait()
            if error is None and finish is not None:
                finish(value)
        except BaseException as e:  # noqa: BLE001 - it goes to whoever waits on the future
            error = error or as_gloo_says(e)
    if ending is not None:
        ending()
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def as_gloo_says(error: BaseException) -> BaseException:
    """``error``, where it is collectives' TimeoutError (the group's timeout passed), worded so
    that it says " Timed out ", as gloo's do: PyTorch's suite, and code written for gloo, look
    for that."""
    if isinstance(error, cc.TimeoutError):
        return cc.TimeoutError(f"collectives: Timed out (the group's timeout passed): {error}")
    return error


def chained(future: torch.futures.Future) -> torch.futures.Future:
    """``future`` as torch's C++ side must see it. A Python Future's set_exception() stores
    the exception as its *result*, which DDP takes for the tensors (and crashes on); an
    exception raised in a then() callback fails the chained Future for C++ too."""
    return future.then(_value)


def _value(future: torch.futures.Future) -> Any:
    return future.value()  # raises the exception that the future holds


def _seconds(timeout: Any) -> Optional[float]:
    """torch's wait(timeout): a timedelta, milliseconds, or nothing; 0 (kNoTimeout) is none."""
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout) / 1000.0
    return seconds if seconds > 0 else None


def _timed_out(what: str, seconds: float) -> cc.TimeoutError:
    return cc.TimeoutError(f"{what} did not finish within wait(timeout={seconds:g} s); it goes on")


class Work(dist._Work):
    """What a collective of the process group returns: wait() and get_future(), as DDP and
    torch.distributed use them. wait() sleeps on an event set the moment the future is
    completed (no polling), and wakes for Ctrl-C."""

    def __init__(self, future: torch.futures.Future):
        super().__init__()
        self._future = future  # raises collectives' own error in wait()
        self._chained = chained(future)  # its then() runs before the callback below
        self._done = threading.Event()
        future.add_done_callback(lambda _: self._done.set())

    def wait(self, timeout: Any = None) -> bool:
        seconds = _seconds(timeout)
        if not self._done.wait(seconds):
            raise _timed_out("the collective", seconds)
        self._future.wait()  # raises the collective's error
        return True

    def get_future(self) -> torch.futures.Future:
        return self._chained

    def is_completed(self) -> bool:
        return self._chained.done()

    def is_success(self) -> bool:
        return self._chained.done() and not self._failed()

    def exception(self) -> Optional[BaseException]:
        try:
            self._future.wait()
        except BaseException as e:  # noqa: BLE001
            return e
        return None

    def _failed(self) -> bool:
        return self.exception() is not None


class MessageWork(dist._Work):
    """A send or a receive: waited on by itself (messages complete in any order, never behind
    a collective or another message); its future is made when asked for."""

    def __init__(self, work: cc.Work, finish: Optional[Callable[[Any], Any]], result: List[torch.Tensor],
                 ending: Ending = None, source: Optional[Callable[[], int]] = None):
        super().__init__()
        self._work, self._finish, self._result, self._ending, self._source = work, finish, result, ending, source
        self._lock = threading.Lock()
        self._finished = False
        self._future: Optional[torch.futures.Future] = None

    def wait(self, timeout: Any = None) -> bool:
        seconds = _seconds(timeout)
        try:
            value = self._work.wait(seconds)
        except TimeoutError as e:  # the builtin one: only this wait's timeout passed
            if isinstance(e, cc.CollectiveError):
                raise as_gloo_says(e) from e
            raise _timed_out("the message", seconds) from None
        with self._lock:
            if not self._finished:
                self._finished = True
                if self._finish is not None:
                    self._finish(value)
                if self._ending is not None:
                    self._ending()
        return True

    def is_completed(self) -> bool:
        return self._work.done()

    def get_future(self) -> torch.futures.Future:
        with self._lock:
            if self._future is None:
                self._future = torch.futures.Future()
                threading.Thread(target=self._complete_future, daemon=True, name="collectives-message").start()
            return chained(self._future)

    def _complete_future(self) -> None:
        try:
            self.wait()
        except BaseException as e:  # noqa: BLE001
            self._future.set_exception(e)
            return
        self._future.set_result(self._result)

    def _source_rank(self) -> int:  # noqa: N802 - torch's name
        return self._source() if self._source is not None else -1


# -- staging: what the core reads and writes -------------------------------------------------------
_CORE_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
                torch.int64}
# dtypes the core lacks, reduced exactly in a wider one (integers wrap alike once cast back).
_WIDENED = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64}
_COMPLEX = {torch.complex64, torch.complex128}


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor the core reads and writes: ``tensor`` itself on the CPU; for a CUDA tensor a
    copy in pinned host memory, made before this returns (all-reduces take CUDA tensors as they
    are instead: :func:`reduced`)."""
    if tensor.device.type == "cpu":
        return tensor.detach()  # the same memory; a parameter that requires grad may not be exported
    if tensor.device.type == "cuda" and torch.cuda.is_available():
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        staged.copy_(tensor)  # waits for the tensor's stream
        return staged
    raise TypeError(f"collectives' torch backend takes CPU tensors, and CUDA tensors where CUDA is available; "
                    f"got a tensor on {tensor.device}: move it to the CPU first")


def _contiguous_host(tensor: torch.Tensor) -> torch.Tensor:
    host = to_host(tensor)
    return host if host.is_contiguous() else host.contiguous()


def _copy_back(tensor: torch.Tensor, host: torch.Tensor) -> Optional[Callable[[Any], Any]]:
    """What puts ``host``'s bytes into ``tensor`` after the core wrote them; None if they are
    the same memory already."""
    if host.data_ptr() == tensor.data_ptr() and host.dtype == tensor.dtype and tensor.is_contiguous() \
            and tensor.device.type == "cpu":
        return None
    return lambda _: tensor.copy_(host.view(tensor.shape) if host.dtype == tensor.dtype else host)


def as_bytes_if_needed(tensor: torch.Tensor) -> torch.Tensor:
    """A flat, contiguous host tensor of ``tensor``'s data in a dtype the core has: the data
    itself where it can, else its bytes (bool, int16, complex, ...: for collectives that only
    move data, any dtype is its bytes)."""
    host = _contiguous_host(tensor).reshape(-1)
    if host.dtype in _CORE_DTYPES:
        return host
    return host.view(torch.uint8) if host.numel() else torch.empty(0, dtype=torch.uint8)


def from_bytes(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (what as_bytes_if_needed made, or what the core returned for it) as ``like``'s
    dtype and shape."""
    if flat.dtype != like.dtype:
        flat = flat.view(like.dtype) if flat.numel() else torch.empty(0, dtype=like.dtype)
    return flat.reshape(like.shape)


def moved(tensor: torch.Tensor) -> Tuple[torch.Tensor, Optional[Callable[[Any], Any]]]:
    """For a collective that writes ``tensor`` (broadcast, recv, scatter's output): the flat
    buffer the core writes, and what copies it back (None where it is ``tensor``'s memory)."""
    flat = as_bytes_if_needed(tensor)
    if flat.data_ptr() == tensor.data_ptr() and tensor.is_contiguous() and tensor.device.type == "cpu":
        return flat, None
    return flat, lambda _: tensor.copy_(from_bytes(flat, tensor))


def reduced(tensor: torch.Tensor, op: str, collective: str) -> Tuple[torch.Tensor, str, Optional[Callable[[Any], Any]]]:
    """For a reduction over ``tensor`` in place: the buffer the core reduces, the core's op, and
    what copies the result back. dtypes the core lacks are mapped where that is exact: bool as
    uint8 (sum is max, i.e. or; prod is min, i.e. and), int16/uint16/uint32 widened (integers
    wrap alike once cast back), complex as pairs of reals (sum and avg only); any other dtype
    and op raise a TypeError naming them."""
    dtype = tensor.dtype
    if dtype in _CORE_DTYPES:
        if op == "avg" and not dtype.is_floating_point:
            raise TypeError(f"{collective} with ReduceOp.AVG needs a floating dtype, not {dtype}")
        if _staged_by_the_communicator(tensor, collective):
            return tensor.detach(), op, None  # the same memory; a parameter that requires grad may not be exported
        host = _contiguous_host(tensor)
        return host, op, _copy_back(tensor, host)
    host = _contiguous_host(tensor)
    if dtype == torch.bool:
        if op == "avg":
            raise TypeError(f"{collective} with ReduceOp.AVG needs a floating dtype, not {dtype}")
        buffer = host.view(torch.uint8)
        mapped = {"sum": "max", "prod": "min"}.get(op, op)
        return buffer, mapped, (lambda _: tensor.copy_(buffer.view(torch.bool)))
    if dtype in _WIDENED:
        if op == "avg":
            raise TypeError(f"{collective} with ReduceOp.AVG needs a floating dtype, not {dtype}")
        wide = host.to(_WIDENED[dtype])
        return wide, op, (lambda _: tensor.copy_(wide.to(dtype)))
    if dtype in _COMPLEX:
        if op not in ("sum", "avg"):
            raise TypeError(f"{collective} of {dtype} takes ReduceOp.SUM or AVG (complex numbers have no order, and "
                            f"their product is not element-wise on the real pairs), not {op}")
        pairs = torch.view_as_real(host)
        return pairs, op, _copy_back(tensor, host)
    raise TypeError(f"collectives' torch backend does not reduce {dtype} ({collective}); it reduces float16, "
                    "bfloat16, float32, float64, int8, uint8, int16, uint16, int32, uint32, int64, bool and complex "
                    "(sum, avg)")


def _staged_by_the_communicator(tensor: torch.Tensor, collective: str) -> bool:
    """Whether ``tensor`` (of a dtype the core has, its op one the core takes for it) goes to
    the communicator as it is, on its GPU: an all-reduce of a contiguous CUDA tensor, where
    collectives has its CUDA path. It is staged through pinned host memory piece by piece, the
    copy of piece k+1 (and of DDP's bucket k+1) overlapping the all-reduce of piece k."""
    return (collective == "allreduce" and tensor.device.type == "cuda" and tensor.is_contiguous()
            and _cuda_path_built())


@functools.lru_cache(maxsize=None)
def _cuda_path_built() -> bool:
    """Whether this collectives stages CUDA buffers itself (built where nvcc was found); without
    it, CUDA tensors are copied to pinned host memory by torch (:func:`to_host`) before."""
    return collectives.info.cuda()["built"]


def unreduced(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A part of what :func:`reduced` made of a tensor of ``like``'s dtype, as ``like``'s dtype
    and shape."""
    if like.dtype == torch.bool:
        part = part.view(torch.bool)
    elif like.dtype in _COMPLEX:
        part = torch.view_as_complex(part.reshape(-1, 2))
    elif part.dtype != like.dtype:
        part = part.to(like.dtype)
    return part.reshape(like.shape)


def in_place(tensor: torch.Tensor, op: str, collective: str, start: Callable[[torch.Tensor, str], cc.Work]) -> Step:
    """Starts an in-place reduction of ``tensor`` (staged as :func:`reduced` says)."""
    buffer, mapped, finish = reduced(tensor, op, collective)
    return start(buffer, mapped), finish
