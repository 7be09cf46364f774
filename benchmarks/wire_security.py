"""What protecting every frame costs (COLLECTIVES_WIRE_SECURITY): collectives' all-reduce with
the frames unprotected (none), authenticated (mac, the default) and encrypted (aead), job by
job on the same hosts and buffers.

    python benchmarks/wire_security.py --hosts 4 --rate 500mbit                # ring, emulated cluster (root)
    python benchmarks/wire_security.py --hosts 4 --reducers 4 --rate 500mbit   # reduction server, emulated
    python benchmarks/wire_security.py --loopback --hosts 4                    # ring on loopback (no root)

A job holds every rank of one mode (the workers and reducers of a job must agree on it), so
the modes alternate job by job: each round runs one job per mode, the order rotating from
round to round, --rounds rounds. A job is benchmarks/allreduce.py (--systems collectives): it
times --pairs samples of the all-reduce at --size and checks every result (#wrong). On the
emulated cluster the jobs run as benchmarks/compare.py runs them (one testbed for all, ranks
placed and link bytes checked); on loopback under mpirun on this machine, where the cores,
not a network, set the pace, so the cost shows in full (a lower bound of nothing: the
emulated figure is what a cluster sees).

Reported per mode: the median job time per all-reduce, and the median over rounds of
t_mode / t_none (1.03 = 3% slower than unprotected frames). --results MD rewrites the block
"wire-security NAME" of MD (benchmarks/RESULTS.md) with the table, the command and the date.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import _checks
import _common
import compare
import testbed

MODES = ("none", "mac", "aead")
HERE = Path(__file__).resolve().parent
TOOL = "wire_security.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--hosts", type=int, default=4, help="worker hosts (ranks on --loopback; default 4)")
    add("--reducers", type=int, default=0, help="reducer hosts beside them: the reduction server (default 0)")
    add("--rate", default="500mbit", help="each link's rate (default 500mbit)")
    add("--size", default="64M", help="message size (default 64M)")
    add("--rounds", type=int, default=5, help="rounds of one job per mode (default 5)")
    add("--pairs", type=int, default=3, help="timed samples per job (default 3)")
    add("--loopback", action="store_true", help="on this machine's loopback, without the testbed (no root)")
    add("--results", metavar="MD", help="rewrite this run's block of MD (benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.hosts < 2 or args.reducers < 0 or args.rounds < 1 or args.pairs < 1:
        parser.error("need --hosts >= 2, --reducers >= 0, --rounds >= 1 and --pairs >= 1")
    if args.loopback and args.reducers:
        parser.error("--loopback measures the ring; the reduction server is measured on the emulated cluster")
    return args


def rotated(round_index):
    """The modes in this round's order: each mode goes first as often as the others."""
    shift = round_index % len(MODES)
    return MODES[shift:] + MODES[:shift]


def run_loopback(args, mode):
    """One job of `args.hosts` ranks under mpirun on this machine; its collectives row."""
    with tempfile.TemporaryDirectory(prefix="cc-wire-") as work:
        rows_file = Path(work) / "rows.json"
        env = {**compare.base_env(), **compare.RUN_AS_ROOT, "COLLECTIVES_WIRE_SECURITY": mode,
               **compare.PINNED_ENV}
        env.pop("COLLECTIVES_SOCKET_IFNAME", None)  # loopback: no testbed interface
        size = str(_common.parse_size(args.size))
        command = [str(Path(sys.executable).parent / "mpirun"), "--oversubscribe", "-np", str(args.hosts),
                   "-x", "COLLECTIVES_WIRE_SECURITY", sys.executable, str(HERE / "allreduce.py"),
                   "--min", size, "--max", size, "--pairs", str(args.pairs), "--systems", "collectives",
                   "--json", str(rows_file)]
        subprocess.run(command, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
        return json.loads(rows_file.read_text())[0]


def run_emulated(bed, args, mode):
    """One job across the testbed (compare.py's, link bytes checked); its collectives row."""
    job_args = compare.parse_args(["--hosts", str(args.hosts), "--reducers", str(args.reducers), "--rate", args.rate,
                                   "--size", args.size, "--pairs", str(args.pairs), "--systems", "collectives"])
    found, reducer_info = compare.run_job(bed, job_args, args.hosts, args.reducers,
                                          settings={"COLLECTIVES_WIRE_SECURITY": mode})
    rows = [compare.with_link_figures(row, bed, reducer_info) for row in found]
    _checks.check_traffic([problem for row in rows for problem in compare.link_problems(row)])
    return rows[0]


def measure(args, run):
    """{mode: [row per round]}, the modes alternating job by job."""
    rows = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        for mode in rotated(index):
            row = run(mode)
            if row["wrong"]:
                raise SystemExit(f"{mode}: {row['wrong']} wrong elements: results are not trusted")
            rows[mode].append(row)
            print(f"# round {index + 1}/{args.rounds}: {mode:<4} {row['time_s'] * 1e3:9.1f} ms", flush=True)
    return rows


def summary(rows):
    """Per mode: (median time, median over rounds of t_mode / t_none)."""
    baseline = [row["time_s"] for row in rows["none"]]
    return {mode: (_common.median([row["time_s"] for row in found]),
                   _common.paired_ratio([row["time_s"] for row in found], baseline))
            for mode, found in rows.items()}


def table(args, rows, where):
    first = rows["none"][0]
    lines = [f"{where}; {first['bytes']} bytes of {first['dtype']}, {args.rounds} rounds of one job per mode, "
             f"{args.pairs} timed samples per job; algorithm {first['algorithm']}", "",
             "| wire security | time (ms) | algbw (GB/s) | vs none | #wrong |", "| --- | ---: | ---: | ---: | ---: |"]
    for mode, (seconds, ratio) in summary(rows).items():
        wrong = sum(row["wrong"] for row in rows[mode])
        lines.append(f"| {mode} | {seconds * 1e3:.1f} | {first['bytes'] / seconds / 1e9:.4f} | {ratio:.3f} | {wrong} |")
    return lines


def block_name(args):
    if args.loopback:
        return f"wire-security loopback {args.hosts} {args.size}"
    layout = f"{args.hosts}+{args.reducers}" if args.reducers else str(args.hosts)
    return f"wire-security {layout} {args.rate} {args.size}"


def main(argv=None):
    args = parse_args(argv)
    if args.loopback:
        where = f"loopback, {args.hosts} ranks on this machine's {os.cpu_count()} cores"
        rows = measure(args, lambda mode: run_loopback(args, mode))
    else:
        with testbed.Testbed(hosts=args.hosts + args.reducers, rate=args.rate) as bed:
            where = f"emulated cluster, {args.hosts} worker hosts" + (
                f" + {args.reducers} reducer hosts" if args.reducers else "") + f"; {bed.tc_description()}"
            rows = measure(args, lambda mode: run_emulated(bed, args, mode))
    lines = table(args, rows, where)
    print("\n".join(lines))
    if args.results:
        name = block_name(args)
        command = "python benchmarks/wire_security.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        block = compare.generated_block(name, TOOL, rows["none"][0]["commit"], command, lines + [""])
        compare.update_results(args.results, block, name, TOOL)
        print(f"# rewrote the '{name}' block of {args.results}")


if __name__ == "__main__":
    main()
