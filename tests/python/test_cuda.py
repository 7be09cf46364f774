"""The CUDA build feature on a machine without a GPU: the extension carries the kernels where
nvcc was found at build time and imports all the same, collectives-info says so, and nothing
CUDA runs (the kernels' checks are in tests/gpu/check_cuda.py, for a machine with a GPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collectives import _core

INFO = Path(sys.executable).parent / "collectives-info"
NO_GPU = "no GPU here: tests/gpu/check_cuda.py checks the kernels and a 2-rank all-reduce where there is one"


@pytest.mark.skipif(not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
                    reason="no nvcc on this machine: the build leaves the CUDA kernels out")
def test_the_kernels_are_built_where_nvcc_is_found():
    assert _core.cuda.BUILT, "nvcc is on this machine, but the installed build has no CUDA kernels"


@pytest.mark.skipif(not _core.cuda.BUILT, reason="this build has no CUDA kernels")
def test_a_cuda_build_imports_and_reports_without_a_gpu():
    out = subprocess.run([str(INFO), "--json"], capture_output=True, text=True, timeout=60, check=True)
    cuda = json.loads(out.stdout)["build"]["cuda"]
    assert cuda["built"] and cuda["runtime"][0].isdigit(), cuda
    assert cuda["devices"] == _core.cuda.devices()


@pytest.mark.skipif(not _core.cuda.BUILT or _core.cuda.devices() > 0, reason="a GPU is present")
def test_without_a_gpu_the_device_calls_fail_with_cudas_reason():
    """No driver or device: a call into the kernels raises CollectiveError naming CUDA's error,
    never crashes."""
    import collectives

    with pytest.raises(collectives.CollectiveError, match="CUDA|cuda"):
        _core.cuda.reduce_into(8, 8, 1, _core.DTYPES.index("float32"), _core.OPS.index("sum"))


@pytest.mark.skipif(not _core.cuda.BUILT or _core.cuda.devices() > 0, reason="a GPU is present")
def test_without_a_gpu_the_staging_engine_names_the_cuda_call_that_failed():
    """The CUDA copy engine of the staged all-reduce (csrc/kernels/cuda/cuda_copy_engine.cu)
    cannot run here; making it fails with CollectiveError naming CUDA's call and reason."""
    import collectives

    with pytest.raises(collectives.CollectiveError, match=r"cuda\w+ failed: "):
        _core.StagedAllreduce.cuda(0, 4 << 20, 4)


@pytest.mark.skipif(not _core.cuda.BUILT or _core.cuda.devices() == 0, reason=NO_GPU)
def test_the_gpu_script_passes():
    script = Path(__file__).resolve().parents[1] / "gpu" / "check_cuda.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
