"""The environment a test's child processes start from: this one, less the variables that a
launcher around the test run (mpirun, torchrun, a CI job, a testbed) may have set, which would
change how a rank process starts; the command that starts a reducer; and the benchmark scripts
as modules."""

import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict

REDUCER_COMMAND = [sys.executable, "-m", "collectives.reduction_server"]

_LAUNCHER_PREFIXES = ("COLLECTIVES_", "OMPI_", "PMI_", "PMIX_", "MV2_", "PRTE_", "TORCHELASTIC_", "TESTBED_")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT")


def clean_environ() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}


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
