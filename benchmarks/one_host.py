"""One host: collectives on each of its transports against Open MPI and gloo (issue 11's bars).

    .venv/bin/mpirun --allow-run-as-root --oversubscribe -np 4 \\
        .venv/bin/python benchmarks/one_host.py [--transports tcp,shm] [--results benchmarks/RESULTS.md]

benchmarks/allreduce.py does the timing: in the same processes, on the same random buffers,
the systems alternate round by round and every timed all-reduce is checked (#wrong). Here the
systems are collectives once per COLLECTIVES_TRANSPORT value (--transports; by default every
transport that collectives-info lists for the installed build, each a communicator of its own
named collectives-TRANSPORT, whose configuration must say it runs that transport; its
algorithm is collectives' own choice per call, --algorithm auto), Open MPI's
MPI_Allreduce through mpi4py (on one host its shared-memory BTL) and gloo through
torch.distributed, at 8 B, 4 KiB, 1 MiB and 64 MiB of float32 (--sizes).

Reported per size and system: the median and the 90th percentile over rounds of the slowest
rank's time per all-reduce (a sample batches enough all-reduces to last ~20 ms, so these are
medians and p90s of sample means), algbw, #wrong, and each collectives transport's speed-up
against every other system: the median over rounds of t_peer / t_collectives (above 1:
collectives is faster). Then issue 11's bars for each transport, each marked met, NOT met, or
not measured (a size or a peer missing from the run):
  64 MiB: >= 2x collectives over loopback TCP (transports other than tcp), >= 1.2x Open MPI,
  >= 2x gloo; 8 B - 4 KiB: latency <= 3x Open MPI's (speed-up >= 1/3) and <= 1/10 of gloo's
  (speed-up >= 10); 1 MiB: >= 1.0x Open MPI; idle: < 1% of a core.

Idle CPU: after the timed all-reduces every rank does nothing for --idle-seconds (2 s), and
each communicator's threads (those that appeared while it started) are charged the CPU time
the kernel counted for them in that window (/proc/self/task/TID/schedstat: the nanoseconds
that utime + stime are cut from); reported as a fraction of one core, the largest over
ranks. The whole process's utime + stime over the same window is reported beside it (gloo's
and Open MPI's threads included; clock ticks, 10 ms each).

--results MD rewrites the block "one-host N ranks" of MD (benchmarks/RESULTS.md) with the
table, the bars and the command. All ranks share the host's cores: on a machine shared with
other work the figures move with its load, which the block states (at the start and the end).
"""

import datetime
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from mpi4py import MPI

import _common
import allreduce
import compare

TOOL = "one_host.py"
DEFAULT_SIZES = "8,4K,1M,64M"
TCP = "collectives-tcp"
KIB, MIB = 1 << 10, 1 << 20
IDLE_BAR = 0.01  # of one core
# (what, the sizes it covers, the peer, the least speed-up t_peer / t_collectives)
BARS = (
    ("64 MiB: >= 2x collectives over loopback TCP", (64 * MIB,), TCP, 2.0),
    ("64 MiB: >= 1.2x Open MPI", (64 * MIB,), "mpi", 1.2),
    ("64 MiB: >= 2x gloo", (64 * MIB,), "gloo", 2.0),
    ("8 B - 4 KiB: latency <= 3x Open MPI's", (8, 4 * KIB), "mpi", 1 / 3),
    ("8 B - 4 KiB: latency <= 1/10 of gloo's", (8, 4 * KIB), "gloo", 10.0),
    ("1 MiB: >= 1.0x Open MPI", (MIB,), "mpi", 1.0),
)


def parse_args(argv=None):
    parser = allreduce.build_parser(__doc__)
    parser.add_argument("--idle-seconds", type=float, default=2.0,
                        help="how long to measure idle CPU (0: not at all; default 2)")
    parser.add_argument("--results", metavar="MD", help="rewrite this run's block of MD (benchmarks/RESULTS.md)")
    parser.set_defaults(sizes=allreduce._size_list(DEFAULT_SIZES), transports=["build"], pairs=10, algorithm="auto")
    return allreduce.checked_args(parser, argv)


def thread_cpu_seconds(tids):
    """CPU time the kernel counted for these threads of this process (those still alive)."""
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stats:
                total += int(stats.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def process_cpu_seconds():
    """utime + stime of this process (every thread), from /proc/self/stat."""
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(world, systems, seconds):
    """{communicator name: its threads' CPU over `seconds` of no collectives, as a fraction of
    one core, the largest over ranks; "process": the whole process's} (rank 0; None elsewhere)."""
    communicators = [s for s in systems if isinstance(s, allreduce.Collectives)]
    world.Barrier()
    before = [thread_cpu_seconds(s.threads) for s in communicators], process_cpu_seconds()
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    mine = {s.name: (thread_cpu_seconds(s.threads) - used) / elapsed for s, used in zip(communicators, before[0])}
    mine["process"] = (process_cpu_seconds() - before[1]) / elapsed
    mine["threads"] = {s.name: len(s.threads) for s in communicators}
    everyone = world.gather(mine)
    if world.rank != 0:
        return None
    worst = {name: max(rank[name] for rank in everyone) for name in mine if name != "threads"}
    worst["threads"] = mine["threads"]
    worst["seconds"] = seconds
    return worst


def by_system(rows):
    """{bytes: {system: row}}."""
    found = {}
    for row in rows:
        found.setdefault(row["bytes"], {})[row["system"]] = row
    return found


def speedup(sized, system, peer):
    """The median over rounds of t_peer / t_system at one size, or None if either is missing."""
    if system not in sized or peer not in sized:
        return None
    return _common.paired_ratio(sized[peer]["times_s"], sized[system]["times_s"])


def bar_lines(rows, idle):
    """Issue 11's bars for each collectives transport of the run: (lines, any bar not met)."""
    table = by_system(rows)
    systems = sorted({row["system"] for row in rows if row["system"].startswith("collectives")})
    lines, missed = [], False
    for system in systems:
        lines.append(f"{system}:")
        for what, sizes, peer, least in BARS:
            if peer == system:
                continue
            found = [(size, speedup(table.get(size, {}), system, peer)) for size in sizes]
            measured = [(size, ratio) for size, ratio in found if ratio is not None]
            if len(measured) < len(sizes):
                lines.append(f"- {what}: not measured")
                continue
            met = all(ratio >= least for _, ratio in measured)
            missed |= not met
            figures = ", ".join(f"{_size(size)} {ratio:.2f}x" for size, ratio in measured)
            lines.append(f"- {what} (speed-up >= {least:.2f}x): {figures}: {'met' if met else 'NOT met'}")
        if idle is not None and system in idle:
            met = idle[system] < IDLE_BAR
            missed |= not met
            lines.append(f"- idle: < 1% of a core: {idle[system]:.2%} over {idle['seconds']:g} s "
                         f"({idle['threads'][system]} threads): {'met' if met else 'NOT met'}")
        else:
            lines.append("- idle: < 1% of a core: not measured")
    return lines, missed


def table_lines(rows):
    """A markdown table: per size and system the median and p90, algbw, #wrong and each
    collectives transport's speed-up against the other systems."""
    systems = list(dict.fromkeys(row["system"] for row in rows))
    subjects = [s for s in systems if s.startswith("collectives")]
    lines = ["| size | system | median (us) | p90 (us) | algbw (GB/s) | #wrong | "
             + " | ".join(f"vs {peer}" for peer in systems) + " |",
             "| ---: | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in systems) + " |"]
    for size, sized in sorted(by_system(rows).items()):
        for system in systems:
            row = sized.get(system)
            if row is None:
                continue
            ratios = [speedup(sized, system, peer) if system in subjects and peer != system else None
                      for peer in systems]
            lines.append(f"| {_size(size)} | {system} | {row['time_s'] * 1e6:.1f} | {row['time_p90_s'] * 1e6:.1f} "
                         f"| {row['algbw_GBps']:.3f} | {row['wrong']} | "
                         + " | ".join("-" if r is None else f"{r:.2f}x" for r in ratios) + " |")
    return lines


def _from_root(arg):
    """A path inside this checkout as the command run from its root would name it."""
    root = Path(__file__).resolve().parents[1]
    path = Path(arg).resolve()
    return str(path.relative_to(root)) if Path(arg).exists() and path.is_relative_to(root) else shlex.quote(arg)


def _size(nbytes):
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def main(argv=None):
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    rows, notes, idle = allreduce.run(
        args, after=lambda comm, systems: idle_cpu(comm, systems, args.idle_seconds) if args.idle_seconds else None)
    if world.rank != 0:
        return
    wrong = sum(row["wrong"] for row in rows)
    where = (f"{world.size} ranks on one host ({socket.gethostname()}, {os.cpu_count()} cores shared by all ranks and "
             f"by other work on the machine; load average {os.getloadavg()[0]:.2f} at the end)")
    lines = [where, "", *[f"- {note}" for note in notes], "",
             *table_lines(rows), "", "Issue 11's bars (speed-up: median over rounds of t_peer / t_collectives):", "",
             *bar_lines(rows, idle)[0]]
    if idle is not None:
        lines += ["", f"Idle CPU over {idle['seconds']:g} s of no collectives, whole process (gloo's and Open MPI's "
                      f"threads too, the largest over ranks): {idle['process']:.2%} of a core"]
    if wrong:
        lines += ["", f"{wrong} wrong elements: these figures are not to be trusted"]
    print("\n".join(["#", *lines]), flush=True)
    if args.results:
        name = f"one-host {world.size} ranks"
        command = (f".venv/bin/mpirun --allow-run-as-root --oversubscribe -np {world.size} .venv/bin/python "
                   "benchmarks/one_host.py " + " ".join(map(_from_root, argv if argv is not None else sys.argv[1:])))
        block = compare.generated_block(name, TOOL, rows[0]["commit"], command.strip(), lines + [""])
        compare.update_results(args.results, block, name, TOOL)
        print(f"# rewrote the '{name}' block of {args.results} "
              f"({datetime.datetime.now(datetime.timezone.utc):%H:%M UTC})", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        allreduce.logger.exception("rank %d failed; aborting the job", MPI.COMM_WORLD.rank)
        MPI.COMM_WORLD.Abort(1)
