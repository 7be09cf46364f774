"""benchmarks/one_host.py: its plumbing, never its speed. The bars' verdicts from made-up rows,
and a tiny run under mpirun (2 ranks, small sizes, few iterations): every system's rows, the
p90, the idle CPU, the RESULTS.md block; and a transport the communicator does not run is
refused."""

import json

import pytest
from launch_env import BENCHMARKS, load_benchmark

pytestmark = pytest.mark.mpi

one_host = load_benchmark("one_host")
ONE_HOST_PY = BENCHMARKS / "one_host.py"
MIB = 1 << 20


def _row(system, nbytes, times):
    return one_host._common.row(system=system, algorithm=system, bytes=nbytes, time_s=sorted(times)[1],
                                time_p90_s=max(times), times_s=times, algbw_GBps=1.0, wrong=0)


def test_bars_say_met_not_met_and_not_measured():
    rows = [_row("collectives-shm", 64 * MIB, [1.0, 1.0, 1.0]), _row("collectives-tcp", 64 * MIB, [2.5, 2.5, 2.5]),
            _row("mpi", 64 * MIB, [1.1, 1.1, 1.1]), _row("gloo", 64 * MIB, [3.0, 3.0, 3.0]),
            _row("collectives-shm", 8, [1.0, 1.0, 1.0]), _row("mpi", 8, [0.5, 0.5, 0.5]),
            _row("gloo", 8, [20.0, 20.0, 20.0])]
    idle = {"collectives-shm": 0.002, "collectives-tcp": 0.03, "threads": {"collectives-shm": 2, "collectives-tcp": 3},
            "seconds": 2.0}
    lines, missed = one_host.bar_lines(rows, idle)
    text = "\n".join(lines)
    assert missed
    shm = text.split("collectives-tcp:")[0]
    assert "64 MiB: >= 2x collectives over loopback TCP (speed-up >= 2.00x): 64 MiB 2.50x: met" in shm
    assert "64 MiB: >= 1.2x Open MPI (speed-up >= 1.20x): 64 MiB 1.10x: NOT met" in shm
    assert "64 MiB: >= 2x gloo (speed-up >= 2.00x): 64 MiB 3.00x: met" in shm
    assert "8 B - 4 KiB: latency <= 3x Open MPI's: not measured" in shm  # 4 KiB is missing
    assert "1 MiB: >= 1.0x Open MPI: not measured" in shm
    assert "idle: < 1% of a core: 0.20% over 2 s (2 threads): met" in shm
    tcp = text.split("collectives-tcp:")[1]
    assert "loopback TCP" not in tcp  # no bar against itself
    assert "idle: < 1% of a core: 3.00% over 2 s (3 threads): NOT met" in tcp
    assert one_host.bar_lines(rows[:4], None)[0][-1] == "- idle: < 1% of a core: not measured"


def test_p90_and_sizes():
    assert one_host._common.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], 90) == 10.0
    assert one_host._common.percentile([5.0], 90) == 5.0
    assert one_host.parse_args([]).sizes == [8, 4096, MIB, 64 * MIB]
    assert one_host.parse_args(["--sizes", "4K,8"]).max == 4096


def _run(run_mpirun, tmp_path, *args, timeout=120):
    argv = ["one_host.py", "--iters", "2", "--pairs", "2", "--idle-seconds", "0.3", *map(str, args)]
    script = (f"import runpy, sys\nsys.path.insert(0, {str(BENCHMARKS)!r})\nsys.argv = {argv!r}\n"
              f"runpy.run_path({str(ONE_HOST_PY)!r}, run_name='__main__')\n")
    return run_mpirun(script, 2, timeout=timeout)


@pytest.mark.timeout(180)
def test_a_tiny_run_writes_every_systems_rows_and_its_block(run_mpirun, tmp_path):
    results = tmp_path / "RESULTS.md"
    begin, end = one_host.compare.markers("one-host 2 ranks", one_host.TOOL)
    results.write_text(f"# before\n\n{begin}\nold\n{end}\n\n# after\n")
    rows_file = tmp_path / "rows.json"
    done = _run(run_mpirun, tmp_path, "--sizes", "8,4K", "--transports", "tcp", "--json", rows_file,
                "--results", results)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    systems = {row["system"] for row in rows}
    assert {"collectives-tcp", "mpi"} <= systems and systems <= {"collectives-tcp", "mpi", "gloo"}
    assert sorted({row["bytes"] for row in rows}) == [8, 4096]
    for row in rows:
        assert row["wrong"] == 0 and row["rounds"] >= 2 and len(row["times_s"]) == row["rounds"]
        assert min(row["times_s"]) <= row["time_s"] <= row["time_p90_s"] <= max(row["times_s"])
    text = results.read_text()
    assert text.startswith("# before\n") and text.endswith("# after\n") and "\nold\n" not in text
    assert "benchmarks/one_host.py --iters 2" in text and "--transports tcp" in text
    assert "| 4 KiB | collectives-tcp |" in text and "| 8 B | mpi |" in text
    assert "- 8 B - 4 KiB: latency <= 3x Open MPI's (speed-up >= 0.33x): 8 B " in text
    assert "- 64 MiB: >= 1.2x Open MPI: not measured" in text
    assert "- idle: < 1% of a core: " in text and "over 0.3 s" in text
    assert "2 cores" in text or "cores shared" in text


@pytest.mark.timeout(120)
def test_a_transport_the_communicator_does_not_run_is_refused(run_mpirun, tmp_path):
    done = _run(run_mpirun, tmp_path, "--sizes", "8", "--transports", "no-such-transport", "--systems", "collectives")
    assert done.returncode != 0
    assert "no-such-transport" in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
