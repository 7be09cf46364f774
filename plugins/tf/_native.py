"""collectives.tf's TensorFlow custom ops (ops/collectives_ops.cc): compiled against the
installed TensorFlow at first use (g++ with tf.sysconfig's flags), cached, and loaded with
tf.load_op_library; the numpy_function path is the fallback.

COLLECTIVES_TF_OPS chooses: "auto" (the default: the custom ops if they build and load, else
numpy functions), "custom" (the custom ops or an error) or "numpy". One INFO line on the
"collectives" logger says which path is in use and why.

The build is cached in $COLLECTIVES_CACHE (default ~/.cache/collectives), under a name made of
TensorFlow's version, Python's ABI and a hash of the sources, the flags and the compiler ($CXX
or g++, and the first line of its --version: a compiler upgraded builds anew); ranks that start
together build it once (a file lock), and a library is renamed into place only once complete.

The ops queue collectives through collectives' C API (collectives.c_api): nothing of the core
is linked into TensorFlow's process twice. A gradient bucket is a start op (returns a handle
at once) and a wait op (asynchronous: no thread and no GIL held while the collective runs); a
single collective (ctf.allreduce ...) is one op that lends the communicator its thread when
nothing else is queued (no thread hand-off), and otherwise completes asynchronously too."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

import tensorflow as tf

import collectives as cc
from collectives import c_api
from collectives.communicator import op_code

MODE_ENV = "COLLECTIVES_TF_OPS"
MODES = ("auto", "custom", "numpy")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops", "collectives_ops.cc")
logger = logging.getLogger("collectives")
_ERROR = re.compile(r"collectives\.errors\.(CollectiveError|TimeoutError): (.*?)(?: \[Op:\w+\].*)?$", re.DOTALL)

_lock = threading.Lock()
_chosen = False
_ops = None  # the loaded op module, or None: numpy functions
_library = None  # the same library's C functions (ctypes)


def ops():
    """The custom ops' module, or None where collectives run in numpy functions; chosen once per
    process (COLLECTIVES_TF_OPS), with one log line."""
    global _chosen, _ops, _library
    with _lock:
        if not _chosen:
            _ops, _library = _choose(os.environ.get(MODE_ENV, "auto"))
            _chosen = True
        return _ops


def in_flight() -> int:
    """How many collectives the start ops began that no wait op has taken yet."""
    return _library.collectives_tf_in_flight()


def forget(handle: tf.Tensor) -> None:
    """Drops a start op's collective that no wait op will take (an eager step that failed before
    its wait; in a graph the step's end drops them): its buffers are freed once it ends."""
    _library.collectives_tf_forget(ctypes.c_int64(int(handle)))


def ops_in_use() -> str:
    """"custom" where collectives.tf's collectives run in its TensorFlow custom ops, "numpy"
    where they run in tf.numpy_function (chosen at the first call: see COLLECTIVES_TF_OPS)."""
    return "numpy" if ops() is None else "custom"


def _choose(mode: str):
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "numpy":
        logger.info("collectives.tf: collectives run in tf.numpy_function (%s=numpy)", MODE_ENV)
        return None, None
    try:
        module, library, how = _load()
    except OpBuildError as error:
        if mode == "custom":
            raise
        logger.info("collectives.tf: collectives run in tf.numpy_function: its TensorFlow ops are unavailable (%s)", error)
        return None, None
    logger.info("collectives.tf: collectives run in TensorFlow custom ops (%s)", how)
    return module, library


class OpBuildError(RuntimeError):
    """The custom ops could not be built or loaded; the message says why (and where the
    compiler's output is)."""


def cache_path() -> str:
    """Where this TensorFlow's build of the ops lives (made by the first use)."""
    flags = tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()
    digest = hashlib.sha256()
    for path in (SOURCE, os.path.join(c_api.include_dir(), "collectives", "c_api.h")):
        with open(path, "rb") as source:
            digest.update(source.read())
    digest.update("\0".join(flags + [_compiler(), _compiler_version()]).encode())
    root = os.environ.get("COLLECTIVES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "collectives")
    name = f"tf{tf.__version__}-{sys.implementation.cache_tag}-{digest.hexdigest()[:16]}"
    return os.path.join(root, "tf-ops", name, "collectives_tf_ops.so")


def _load():
    """(the loaded op module, its library's C functions, how it was had)."""
    path = cache_path()
    how = f"loaded {path}"
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one rank of a host builds, the others wait for it
            if not os.path.exists(path):
                _build(path)
                how = f"built {path}"
    try:
        module = tf.load_op_library(path)
        library = ctypes.CDLL(path)
        library.collectives_tf_in_flight.restype = ctypes.c_int64
        bound = library.collectives_tf_bind(ctypes.c_void_p(c_api.table_address()))
    except (tf.errors.OpError, OSError, AttributeError) as error:
        raise OpBuildError(f"{path} did not load: {error}") from None
    if bound != 0:
        raise OpBuildError(f"{path} was built for another version of collectives' C API than {c_api.VERSION}")
    return module, library, how


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _compiler_version() -> str:
    """The first line of the compiler's --version ("g++ (Debian 12.2.0-14) 12.2.0"); "" where it
    does not run (_build says why)."""
    try:
        result = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.partition("\n")[0].strip()


def _build(path: str) -> None:
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise OpBuildError(f"no C++ compiler: {compiler} is not on the PATH (set CXX)")
    log = os.path.join(os.path.dirname(path), "build.log")
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, "-std=c++17", "-shared", "-fPIC", "-O2", "-Wno-deprecated-declarations", SOURCE, "-o", partial,
               "-I", c_api.include_dir(), *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        os.unlink(partial)
        raise OpBuildError(f"{compiler} failed (exit {result.returncode}): its output is in {log}")
    os.replace(partial, path)


def _attrs(comm: cc.Communicator, dtype: tf.DType, kind: str, op: str, root: int) -> dict:
    return {"kind": kind, "communicator": comm.c_handle, "root": root,
            "reduce_op": op_code(op, dtype.name) if kind == "allreduce" else 0}


def start(comm: cc.Communicator, flat: tf.Tensor, kind: str, op: str = "sum", root: int = 0) -> tf.Tensor:
    """Queues ``kind`` (allreduce, allgather, broadcast) of the 1-D ``flat``: its handle."""
    # In a graph the step's end forgets a start that no wait op took (a failed step's).
    return _ops.collectives_start(flat, forget_at_step_end=not tf.executing_eagerly(),
                                  **_attrs(comm, flat.dtype, kind, op, root))


def wait(handle: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """The 1-D result of the collective ``handle`` stands for, once it is done."""
    with _collective_errors():
        return _ops.collectives_wait(handle, T=dtype)


@contextlib.contextmanager
def _collective_errors() -> Iterator[None]:
    """Eagerly a collective's failure raises collectives.CollectiveError (or TimeoutError), as
    the numpy path's does; in a graph TensorFlow reports it as UnknownError, with its name."""
    try:
        yield
    except tf.errors.UnknownError as error:
        # Eagerly TensorFlow wraps the op's message: "{{function_node ...}}MESSAGE [Op:NAME] name: "
        found = _ERROR.search(error.message)
        if found is None:
            raise
        kind = cc.TimeoutError if found.group(1) == "TimeoutError" else cc.CollectiveError
        raise kind(found.group(2)) from None


def run(comm: cc.Communicator, tensor: tf.Tensor, kind: str, op: str = "sum", root: int = 0) -> tf.Tensor:
    """One collective of ``tensor``: a tensor of its shape (an all-gather's: (size, *shape))."""
    with _collective_errors():
        out = _ops.collectives_run(tensor, **_attrs(comm, tensor.dtype, kind, op, root))
    if kind == "allgather" and not tf.executing_eagerly():
        out.set_shape(tf.TensorShape([comm.size]).concatenate(tensor.shape))
    return out
