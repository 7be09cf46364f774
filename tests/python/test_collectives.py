"""Every collective, dtype and op against numpy, on 1-5 real processes over real sockets.

Each rank count's whole matrix runs inside one job (one process per rank, started once), and
property-based cases are drawn here by hypothesis and sent to the ranks in a file.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import collective_cases as cases_lib
from launch_env import TRANSPORTS, transport_env

HERE = Path(__file__).resolve().parent

COUNTS = [0, 1, 2, 3, 7, 13, 1009, 65537, 300007]


def test_the_installed_package_is_tested():
    import collectives

    source_tree = HERE.parent.parent / "collectives"
    assert Path(collectives.__file__).resolve().parent != source_tree.resolve(), (
        "tests import the source folder, which would hide a missing compiled module: "
        "run pytest from tests/ against the installed package (scripts/test)"
    )
    assert hasattr(collectives, "_core")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_matrix(run_ranks, tmp_path, size):
    cases_lib.run_job(run_ranks, tmp_path, size, cases_lib.matrix(size, COUNTS))


def test_many_segments_and_connections(run_ranks, tmp_path):
    """Tiny segments (hundreds per block) striped over two sockets per peer."""
    env = {"COLLECTIVES_RING_SEGMENT_BYTES": "4K", "COLLECTIVES_CONNECTIONS_PER_PEER": "2"}
    cases_lib.run_job(run_ranks, tmp_path, 3, cases_lib.matrix(3, [0, 1, 5, 4099, 100003]), env=env)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_matrix_on_each_transport(run_ranks, tmp_path, transport):
    """Ranks of one host: auto (test_matrix) takes shared memory; each forced here."""
    cases_lib.run_job(run_ranks, tmp_path, 3, cases_lib.matrix(3, [0, 1, 7, 1009, 65537, 300007]),
                      env=transport_env(transport))


@pytest.mark.parametrize("algorithm", ["ring", "recursive_doubling"])
def test_each_allreduce_algorithm_forced(run_ranks, tmp_path, algorithm):
    """COLLECTIVES_ALGORITHM forces one member of the ring family at every size (auto picks
    by size: test_matrix)."""
    cases_lib.run_job(run_ranks, tmp_path, 3, cases_lib.matrix(3, [0, 1, 1009, 65537]),
                      env={"COLLECTIVES_ALGORITHM": algorithm})


@pytest.mark.mpi
def test_under_mpirun(run_mpirun, tmp_path):
    """Bootstrapped over MPI (Open MPI or MPICH, whichever mpirun is installed)."""
    size = 3
    cases = cases_lib.matrix(size, [0, 1, 1009, 65537])
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    result = run_mpirun(cases_lib.RANK_SCRIPT.replace("sys.argv[1]", repr(str(path))), size, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = result.reports()
    assert sorted(r["rank"] for r in reports) == list(range(size))
    for report in reports:
        assert report["problems"] == [], "\n".join(report["problems"])


@st.composite
def drawn_case(draw):
    dtype = draw(st.sampled_from(cases_lib.DTYPES))
    return dict(
        collective="allreduce",
        dtype=dtype,
        op=draw(st.sampled_from(cases_lib.valid_ops(dtype))),
        count=draw(st.integers(0, 200_000)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(drawn_case(), min_size=12, max_size=12))
def test_drawn_cases(run_ranks, tmp_path_factory, cases):
    cases_lib.run_job(run_ranks, tmp_path_factory.mktemp("drawn"), 3, cases)


KINDS_SCRIPT = """
import json
import numpy as np
import torch
import collectives as cc

with cc.init() as comm:
    n, r = comm.size, comm.rank
    checks = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        t = torch.full((3, 5), r + 1, dtype=dtype)
        assert comm.allreduce(t) is t
        checks[f"allreduce {dtype}"] = bool((t == n * (n + 1) // 2).all())
    gathered = comm.allgather(torch.arange(4, dtype=torch.float32) + r)
    checks["allgather is a tensor"] = isinstance(gathered, torch.Tensor) and gathered.shape == (n, 4)
    checks["allgather rows"] = all(bool((gathered[i] == torch.arange(4) + i).all()) for i in range(n))
    part = comm.reduce_scatter(torch.ones(2 * n, 3, dtype=torch.float64), op="avg")
    checks["reduce_scatter avg"] = isinstance(part, torch.Tensor) and part.shape == (2, 3) and bool((part == 1).all())
    b = bytearray(np.full(4, r, np.int32).tobytes())
    comm.broadcast(b, root=n - 1)
    checks["broadcast into a bytearray"] = np.frombuffer(b, np.int32).tolist() == [n - 1] * 4
    works = [comm.allreduce_async(torch.ones(1000) * i) for i in range(8)]
    checks["async in flight"] = all(bool((w.wait() == n * i).all()) for i, w in enumerate(works))
    print(json.dumps(checks))
"""


def test_torch_tensors_and_buffers(run_ranks):
    pytest.importorskip("torch")
    for result in run_ranks(KINDS_SCRIPT, 3, timeout=120):
        assert result.returncode == 0, result.stderr[-3000:]
        checks = result.report()
        assert all(checks.values()), checks
