"""The environment a test's child processes start from: this one, less the variables that a
launcher around the test run (mpirun, torchrun, a CI job, a testbed) may have set, which would
change how a rank process starts; and the command that starts a reducer."""

import os
import sys
from typing import Dict

REDUCER_COMMAND = [sys.executable, "-m", "collectives.reduction_server"]

_LAUNCHER_PREFIXES = ("COLLECTIVES_", "OMPI_", "PMI_", "PMIX_", "MV2_", "PRTE_", "TORCHELASTIC_", "TESTBED_")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT")


def clean_environ() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}
