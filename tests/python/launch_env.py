"""The environment a test's child processes start from: this one, less the variables that a
launcher around the test run (mpirun, torchrun, a CI job, a testbed) may have set, which would
change how a rank process starts, plus the transport that COLLECTIVES_TEST_TRANSPORT forces on
every job of a run; the transports a test can run on; the command that starts a reducer; and
the benchmark scripts as modules."""

import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict

import pytest

REDUCER_COMMAND = [sys.executable, "-m", "collectives.reduction_server"]

_LAUNCHER_PREFIXES = ("COLLECTIVES_", "OMPI_", "PMI_", "PMIX_", "MV2_", "PRTE_", "TORCHELASTIC_", "TESTBED_")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT")


def transport_env(transport: str) -> Dict[str, str]:
    """The variables that run a job over `transport` (with the default wire security, mac)."""
    return {"COLLECTIVES_TRANSPORT": transport}


def ucx_missing() -> str:
    """Why a job cannot run over UCX here; empty if it can."""
    from collectives import _ucx

    info = _ucx.describe()
    if not info["built"]:
        return "this build has no UCX transport (no UCX headers when it was built)"
    return "" if info["loaded"] else info["why"]


# For @pytest.mark.parametrize("transport", TRANSPORTS): each transport of the core, UCX skipped
# with the reason where it cannot run.
TRANSPORTS = ["tcp", "shm", pytest.param("ucx", marks=pytest.mark.skipif(bool(ucx_missing()), reason=ucx_missing()))]


def clean_environ() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}
    # A run of the suite over one transport (scripts/test runs a selection with ucx).
    if os.environ.get("COLLECTIVES_TEST_TRANSPORT"):
        env.update(transport_env(os.environ["COLLECTIVES_TEST_TRANSPORT"]))
    return env


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is no package: its scripts import each
    other by name, so it is on sys.path while one loads)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))
