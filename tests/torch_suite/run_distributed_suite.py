"""PyTorch's own distributed suite (torch.testing._internal.distributed.distributed_test, shipped in
the torch wheel) on the collectives backend, run as PyTorch's test/distributed/test_distributed_spawn.py
runs it: WORLD_SIZE ranks spawned per test, on the CPU, init_method file://.

    python run_distributed_suite.py --backend collectives [-k PATTERN] [--list]
    python run_distributed_suite.py --backend gloo                 # the reference, same machine
    python run_distributed_suite.py --backend gloo-as-collectives  # gloo's own tests, on collectives

Modes:
- ``collectives``: BACKEND=collectives. The suite's decorators then skip what they keep for gloo
  (monitored_barrier_gloo*, batch_isend_irecv_gloo*, sparse_all_reduce_sum, get_future, ...).
- ``gloo-as-collectives``: BACKEND=gloo, so those tests run too, but every process group that the
  suite asks of "gloo" (init_process_group and new_group) is made by collectives' backend: the
  driver wraps torch.distributed.distributed_c10d._new_process_group_helper in every spawned rank
  (each rank imports this file again, which installs the wrapper) to make the group with
  backend "collectives", and records it under the name "gloo" (_world.pg_map), so that
  dist.get_backend() still says gloo (as monitored_barrier asks). Tests that look for
  ProcessGroupGloo's own C++ class or its options fail here, as they would for any other backend.
- ``gloo``: torch's gloo, unchanged.

Prints unittest's summary and a line "RESULT backend=... passed=P failed=F skipped=S errors=E".
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import unittest


def _redirect_gloo_to_collectives() -> None:
    import torch.distributed.distributed_c10d as c10d
    import collectives.torch  # noqa: F401 - registers the backend

    original = c10d._new_process_group_helper

    def helper(group_size, group_rank, global_ranks_in_group, backend, store, group_name, *args, **kwargs):
        asked = str(backend).lower() if backend is not None else ""
        if asked != "gloo":
            return original(group_size, group_rank, global_ranks_in_group, backend, store, group_name, *args, **kwargs)
        kwargs.pop("backend_options", None)
        pg, prefix_store = original(group_size, group_rank, global_ranks_in_group, "collectives", store, group_name,
                                    *args, **kwargs)
        if pg in c10d._world.pg_map:
            c10d._world.pg_map[pg] = ("gloo", c10d._world.pg_map[pg][1])
        return pg, prefix_store

    c10d._new_process_group_helper = helper


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("collectives", "gloo", "gloo-as-collectives"), default="collectives")
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("-k", action="append", default=[], help="run only tests whose names match (regex; repeatable)")
    parser.add_argument("--list", action="store_true", help="list the selected tests and exit")
    parser.add_argument("--timeout", type=float, default=0, help="stop starting tests after this many seconds")
    return parser.parse_args()


# The suite reads BACKEND, WORLD_SIZE and TEMP_DIR when it is imported, and the test class must be
# a module-level name (the ranks find it by name): so the arguments are read at import.
# Spawned ranks import this file again (as __mp_main__), without arguments: they take the mode and
# the folder from the environment the driver set.
ARGS = _arguments() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["COLLECTIVES_TORCH_SUITE_MODE"] = ARGS.backend
    os.environ.update(WORLD_SIZE=str(ARGS.world_size), TEMP_DIR=tempfile.mkdtemp(prefix="collectives-torch-suite-"),
                      INIT_METHOD="file://")
MODE = os.environ.get("COLLECTIVES_TORCH_SUITE_MODE", "collectives")
os.environ["BACKEND"] = "collectives" if MODE == "collectives" else "gloo"
os.environ.pop("COLLECTIVES_TOKEN", None)  # the secret goes through torch's store, as under torchrun
if MODE == "gloo-as-collectives":
    _redirect_gloo_to_collectives()
elif MODE == "collectives":
    import collectives.torch  # noqa: E402,F401

from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend  # noqa: E402


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()


def main() -> int:
    args = ARGS
    loader = unittest.TestLoader()
    names = loader.getTestCaseNames(TestDistBackendWithSpawn)
    if args.k:
        names = [n for n in names if any(re.search(p, n) for p in args.k)]
    if args.list:
        print("\n".join(names))
        return 0
    suite = unittest.TestSuite(TestDistBackendWithSpawn(n) for n in names)

    class Result(unittest.TextTestResult):
        started = time.monotonic()

        def startTest(self, test):  # noqa: N802
            if args.timeout and time.monotonic() - self.started > args.timeout:
                self.stop()
            super().startTest(test)

    runner = unittest.TextTestRunner(verbosity=2, resultclass=Result, stream=sys.stdout)
    result = runner.run(suite)
    passed = result.testsRun - len(result.failures) - len(result.errors) - len(result.skipped)
    print(f"RESULT backend={args.backend} world_size={args.world_size} selected={len(names)} run={result.testsRun} "
          f"passed={passed} failed={len(result.failures)} errors={len(result.errors)} skipped={len(result.skipped)}")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
