"""From collectives' Work objects to torch's: futures completed by a thread of their own once
the core has finished a collective, and tensors staged where the core can reach them."""

from __future__ import annotations

import time

import queue
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

import collectives as cc

# One collective: the core's Work, and what to do with its result once it is done (copy it
# into the caller's tensors), or None.
Step = Tuple[cc.Work, Optional[Callable[[Any], Any]]]


class Completer:
    """A thread that completes torch Futures as the collectives they stand for finish, in the
    order they were started (the order in which every rank issues them). The caller goes on
    at once: DDP starts a bucket's all-reduce and goes on with the backward pass."""

    def __init__(self, name: str):
        self._queue: "queue.SimpleQueue[Optional[Tuple[List[Step], torch.futures.Future, Any]]]" = queue.SimpleQueue()
        self._closed = False
        # A daemon: a job that never destroys its process group must still be able to exit.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def future(self, steps: List[Step], result: Any) -> torch.futures.Future:
        """A Future that gets ``result`` once every step is done, or the first step's error
        (hand torch's C++ side, DDP, :func:`chained` futures instead)."""
        if self._closed:
            raise cc.CollectiveError("this process group is shut down: create a new one")
        future: torch.futures.Future = torch.futures.Future()
        self._queue.put((steps, future, result))
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
            steps, future, result = item
            del item
            error: Optional[BaseException] = None
            for work, finish in steps:
                try:
                    value = work.wait()
                    if error is None and finish is not None:
                        finish(value)
                except BaseException as e:  # noqa: BLE001 - it goes to whoever waits on the future
                    error = error or e
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            del steps, future, result, error


def chained(future: torch.futures.Future) -> torch.futures.Future:
    """``future`` as torch's C++ side must see it. A Python Future's set_exception() stores
    the exception as its *result*, which DDP takes for the tensors (and crashes on); an
    exception raised in a then() callback fails the chained Future for C++ too."""
    return future.then(_value)


def _value(future: torch.futures.Future) -> Any:
    return future.value()  # raises the exception that the future holds


_WAIT_SLICE_SECONDS = 0.05


class Work(dist._Work):
    """What a collective of the process group returns: wait() and get_future(), as DDP and
    torch.distributed use them."""

    def __init__(self, future: torch.futures.Future):
        super().__init__()
        self._future = future  # raises collectives' own error in wait()
        self._chained = chained(future)

    def wait(self, timeout: Any = None) -> bool:
        # The communicator's own timeout bounds every collective. Short waits, so that Ctrl-C
        # is handled promptly between them (a future's wait() blocks in C++ until done).
        while not self._future.done():
            time.sleep(_WAIT_SLICE_SECONDS)
        self._future.wait()  # raises the collective's error
        self._chained.wait()  # done right after, and then so is get_future()
        return True

    def get_future(self) -> torch.futures.Future:
        return self._chained

    def is_completed(self) -> bool:
        return self._chained.done()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor the core reads and writes: ``tensor`` itself on the CPU; for a CUDA tensor a
    copy in pinned host memory (the core is not built against CUDA here)."""
    if tensor.device.type == "cpu":
        return tensor.detach()  # the same memory; a parameter that requires grad may not be exported
    if tensor.device.type == "cuda" and torch.cuda.is_available():
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        staged.copy_(tensor)  # waits for the tensor's stream
        return staged
    raise TypeError(f"collectives' torch backend takes CPU tensors, and CUDA tensors where CUDA is available; "
                    f"got a tensor on {tensor.device}: move it to the CPU first")


def in_place(tensor: torch.Tensor, start: Callable[[torch.Tensor], cc.Work]) -> Step:
    """Starts an in-place collective on ``tensor`` (on its host copy for a CUDA tensor)."""
    host = to_host(tensor)
    work = start(host)
    return work, (None if tensor.device.type == "cpu" else lambda _: tensor.copy_(host))
