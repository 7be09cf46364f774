"""What a new user runs first, run as they would: Python started in the repository's root,
the example's dependencies, and the README's demo as a user without root."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from launch_env import clean_environ

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "torch_ddp.py"


def _in_repo_root(*argv, timeout=60):
    return subprocess.run([*argv], cwd=REPO, env=clean_environ(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv", [["-c", "import collectives"], ["-m", "collectives.reduction_server", "--help"]],
                         ids=["import", "reducer-module"])
def test_python_in_the_repository_root_says_what_to_do(argv):
    """There the source folder, which has no compiled core, hides the installed package."""
    done = _in_repo_root(sys.executable, *argv)
    assert done.returncode != 0
    assert "circular import" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: collectives was imported from its source checkout"), done.stderr
    assert f"the installed package at {Path(sys.executable).parents[1]}" in message  # the venv's copy
    assert "run from another folder" in message and f"pip install -e {REPO}" in message


def test_the_reducer_command_works_in_the_repository_root():
    reducer = Path(sys.executable).parent / "collectives-reducer"
    done = _in_repo_root(str(reducer), "--help")
    assert done.returncode == 0, done.stderr
    assert "--rendezvous" in done.stdout


def test_the_example_trains_with_what_the_examples_extra_installs(run_ranks):
    """examples/torch_ddp.py, a few steps on 2 workers: torch and rich come with the extra
    (scripts/test installs it, as scripts/demo does)."""
    missing = [name for name in ("torch", "rich") if importlib.util.find_spec(name) is None]
    assert not missing, f"the examples extra did not install {', '.join(missing)}"
    results = run_ranks(EXAMPLE.read_text(), 2, launcher="collectives", timeout=240,
                        args=["--steps", "3", "--batch", "2", "--context", "16", "--width", "32", "--layers", "1"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: loss" in results[0].stdout and "samples/s over 2 workers" in results[0].stdout


def _copy_of_the_checkout(owner: str) -> Path:
    """The checkout's files (as a clone would have them) and its built wheel, in a folder of
    `owner`'s under /tmp: a user's own clone, whose first build is already done."""
    copy = Path(tempfile.mkdtemp(prefix="collectives-first-hour-"))
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():  # not a file deleted in the working tree
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    if (REPO / "build" / "wheel" / "SOURCES").is_file():
        shutil.copytree(REPO / "build" / "wheel", copy / "build" / "wheel")
    (copy / "home").mkdir()
    subprocess.run(["chown", "-R", f"{owner}:", str(copy)], check=True)
    copy.chmod(0o755)
    return copy


@pytest.mark.first_hour
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the demo as another user")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_the_demo_runs_for_a_user_without_root():
    """scripts/demo as `nobody`, in a copy of the checkout that is theirs: their own venv, the
    system's python3, the loopback cluster (4 workers, 4 reducers) and its table."""
    copy = _copy_of_the_checkout("nobody")
    try:
        env = {**clean_environ(), "HOME": str(copy / "home"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "scripts/demo"],
                              cwd=copy, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=850)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:]
        assert "== Not root: 4 workers (mpirun) and 4 reducers on this machine's loopback" in done.stdout
        assert "collectives: allreduce runs reduction_server with 4 reducer(s)" in done.stdout
        rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
        assert len(rows) >= 10, done.stdout
        for row in rows:  # size count type redop, then time algbw busbw #wrong per system
            assert [row[7], row[11], row[15]] == ["0", "0", "0"], row
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.mark.first_hour
@pytest.mark.testbed
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: as root the demo runs on the emulated cluster")
@pytest.mark.skipif(shutil.which("tc") is None or shutil.which("ip") is None, reason="needs iproute2")
def test_the_demo_as_root_runs_on_the_emulated_cluster():
    """scripts/demo as root, smaller (the README's command with compare.py's --size and
    --pairs after it): 4 worker hosts and 4 reducer hosts, every row checked, the pace legend
    and a verdict for each ratio."""
    env = clean_environ()
    done = subprocess.run(["scripts/demo", "--size", "4M", "--pairs", "1"], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    out = done.stdout
    assert "== As root: an emulated cluster of 4 worker hosts and 4 reducer hosts" in out
    assert "4 worker hosts + 4 reducer hosts" in out
    # "  <system> [<algorithm>] size time algbw busbw bound vs-gloo #wrong tx/size rx/size cpu pace"
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("  collectives ", "  gloo ",
                                                                                            "  mpi "))}
    assert set(rows) == {"collectives", "gloo", "mpi"}, out
    assert rows["collectives"][1] == "reduction_server"
    for system, row in rows.items():
        assert row[-5] == "0", f"{system}: #wrong {row[-5]}"
        assert row[-1] in ("links", "cpu", "own"), row
    assert "# pace: links = reached" in out
    assert "collectives reduction_server 1." in out or "collectives reduction_server 0." in out
    assert "x gloo at 4194304: " in out  # the verdict on the headline ratio
