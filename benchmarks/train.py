"""DDP training throughput on the emulated cluster: torch gloo, collectives ring and the
collectives reduction server, on the same hosts, rate, model and run (issue 5); with
--framework tf, TensorFlow's MultiWorkerMirroredStrategy against collectives.tf (issue 14).

    python benchmarks/train.py --hosts 4 --reducers 4 --rate 500mbit [--bucket-cap-mb 25,64] [--steps K]
        [--compress fp16[,bf16]]
        [--json F] [--results benchmarks/RESULTS.md]
    python benchmarks/train.py --per-host 2 --hosts 4 [--racks 2 --uplink-rate 250mbit] --rate 500mbit ...
    .venv-tf/bin/python benchmarks/train.py --framework tf --hosts 4 --reducers 4 --rate 500mbit
        [--bucket-cap-mb 25] [--tf-ops numpy,custom] ...

Builds a testbed (benchmarks/testbed.py) of N worker hosts and R reducer hosts, every link at
the same rate, and starts one worker process per worker host with the variables torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = h0, MASTER_PORT), and, with R > 0, one
reducer on each reducer host, as compare.py does (`python -m collectives.reduction_server
--rendezvous H0:PORT`; COLLECTIVES_RENDEZVOUS and COLLECTIVES_NUM_REDUCERS on the workers;
the job's secret in a file of the run, COLLECTIVES_TOKEN_FILE). Every worker process holds
one process group per system: the default group and a second group on gloo, and two groups
of the "collectives" backend: the first spans the job and so gets the reducers (algorithm
reduction_server), the second runs the ring. All are pinned to the testbed's interface and
to one compute thread per worker.

The workload is fixed: an MLP of --layers (6) square layers of --width (2048) with ReLU and a
16-way classifier, 25.2 M parameters (100.8 MB of float32 gradients), trained with SGD
(lr 0.01) on a fixed random batch of --batch (32) samples per worker, cross-entropy loss.
Its compute is small on purpose: one step takes about 0.16 s on one core of this machine,
so with 4 workers on its 2 cores about 0.3 s, against 1.7-2.6 s to move 100 MB over
500 Mbit/s links; communication dominates, as on a cluster whose NICs are the bottleneck.
(--width/--layers/--batch exist for the tests' tiny runs; the issue's figures use the
defaults.)

For each --bucket-cap-mb (default 25 and 64) every system gets a model of its own, built
from the same seed (DDP's bucket_cap_mb set, init_sync off: the copies start equal), and
the systems take turns, one training step each per round, the order rotating from round to
round: "none" (the same model and batch, no DDP, no all-reduce: the step time without
communication), gloo, collectives ring, collectives reduction server. Before each step the
workers meet at a barrier; a step is forward, backward (with DDP's all-reduces, overlapping
the backward pass bucket by bucket) and the optimizer step; its time is the slowest
worker's. --warmup rounds (default 2: DDP rebuilds its buckets after its first step) are
not counted, then --steps timed rounds (default 10). Per system and bucket size a row gives
the median step time, samples/s (N x batch / step time), the median over rounds of the
paired ratio t_gloo / t_system (above 1: faster than gloo), the communication share
1 - t_none / t_system, the medians of forward, backward and optimizer time, DDP's own
per-step timing of the backward pass (compute, all-reduce from the first bucket's start to
the last's end, and their overlap; DDP's runtime logging, sampled every step), the floor of
moving the gradients over the links (ring: 2(n-1)/n x S / B per worker, reduction server:
S / (B min(1, R/N))), the bytes each worker host sent and received per step over S, the
machine's CPU use during the system's steps (cpu_bound above 90%), floor/comm (the comm
floor over DDP's all-reduce time: how close the all-reduces came to the links' limit) and the
row's pace from these two (benchmarks/_checks.py: "links" at >= 90% of the floor, else "cpu"
with the cores > 90% busy, else "own"; a ratio to gloo counts, and the bar can pass, only if
neither row is cpu-paced), and whether the parameters ended identical on every rank (a
SHA-256 of each rank's parameters, allgathered).

--compress fp16 (bf16, or fp16,bf16) adds, per type, gloo and the reduction server with
torch's own DDP hook registered (default_hooks.fp16_compress_hook / bf16_compress_hook: each
bucket divided by N, cast to the half type, all-reduced as such, the reducers summing it in
float32 and rounding once, and cast back): rows "gloo fp16 (fp16_compress_hook)", ...; their
floors and link bytes are those of S/2, their ratio to gloo is to gloo's float32 row (issue
13's bars: reduction server >= 1.45x gloo, with fp16 through the reducers >= 2.2x).

As compare.py does, the driver refuses a run (exit status 1, nothing written) whose workers
did not each run on their own host (each reports its hostname and eth0 address at start), or
whose link bytes per step are not the model's (worker hosts: 2(n-1)/n x S for gloo and the
ring, S for the reduction server; reducer hosts: N/R x S per reduction-server step over the
job): see benchmarks/_checks.py.

Layouts (issue 12), as compare.py's: --per-host K starts K worker processes per host (RANK i on
host i // K, LOCAL_RANK i % K, LOCAL_WORLD_SIZE K), sharing its namespaces, /dev/shm and NIC;
--racks R --uplink-rate RATE spreads the worker hosts over R racks behind uplinks of that
rate, each worker carrying its rack in COLLECTIVES_TOPOLOGY. On such a layout the systems are
none, gloo, the collectives ring and a third collectives group forced to the hierarchical plan
(where the installed collectives offers it; a note says when not), and no reducers unless
asked for (--reducers runs on layouts without racks, for now: with --per-host K the reduction
server runs its host plan, reduction_server:host). Rows carry the layout (hosts, ranks,
per_host, racks) and each collectives row its plan; the floor is the plan's bound on the
layout (the slowest level's, as compare.py's: _checks.plan_bound), and the link bytes per
step are checked per level: each host NIC's and, with racks, each uplink's (worker 0 reads the
uplinks' counters around each step), against the plan's model. samples/s counts every worker.

--timeline says where each step's time goes, from the links rather than from DDP's own timer:
each worker reads its host's link counters every millisecond during the step (a thread in the
worker: it costs some CPU, so the run's other figures are not the plain run's), and per round
the step's wire time runs from the last worker's first bulk bytes out (its first bucket's
all-reduce started) to the last bulk bytes into any worker (the last bucket's result is in).
Per system a line gives its median, the floor, the step's time before the wire (forward
and the backward pass up to the first bucket, on the slowest worker) and after it (DDP's
finishing and the optimizer), and how long the last worker to start took to send its bytes
(first bulk bytes out to last): the floor over that time is the rate its payload crossed its
link at, as a fraction of the goodput B (below 100%: the link idled or carried more than the
payload: frame headers, tags, acknowledgements); and the ratio to gloo that the reduction
server would reach with both systems at their floors and those times.

--framework tf (train_tf.py; a Python with TensorFlow and collectives, e.g. the venv
scripts/test makes, .venv-tf): the same MLP, batch, learning rate and testbed in Keras 3, each
step one tf.function, no DDP. The systems: "none" (no communication), "mwms" (TensorFlow's
tf.distribute.MultiWorkerMirroredStrategy, CommunicationImplementation.RING over gRPC, the
workers named by TF_CONFIG with their hosts' addresses; each worker's loss scaled by the global
batch, Keras' optimizer summing the replicas' gradients through the strategy, in packs of
--bucket-cap-mb), the collectives ring and the reduction server (collectives.tf's
DistributedGradientTape, buckets of --bucket-cap-mb, op "avg"). All live in the same worker
processes (the strategy made first, before TensorFlow runs anything; its model in its scope, the
others outside it) and alternate step by step as with torch; one bucket size per run (the
strategy's pack size is fixed when it is made). A job per collectives.tf op path (--tf-ops,
COLLECTIVES_TF_OPS=numpy or custom), each with its own strategy and "none" rows, the ratios
paired within the job; a path the installed collectives.tf does not run (a one-process probe,
train_tf.offered_ops) is left out with a note, and each job records collectives.tf's log line
on the path it used (a job whose path is not the one asked for is refused). TensorFlow's step
is timed whole: floor/comm is the floor over the step (a lower bound of the all-reduces'), and
the weights' SHA-256 per rank and their largest difference to the strategy's are reported.
Bars (issue 14): the reduction server >= 1.4x the strategy's samples/s, the ring >= 1.0x, per
op path; the custom op's samples/s >= the numpy_function's.

--results MD rewrites the block "ddp N+R RATE" (on layouts "ddp NxK RATE", "ddp NxK racks R
uplink RATE RATE"; with --framework tf "tf N+R RATE") of MD (benchmarks/RESULTS.md) between
    <!-- train.py: begin NAME (generated; rerun the command below to regenerate) -->
    <!-- train.py: end NAME -->
Run as root (it creates network namespaces).
"""

import argparse
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _checks
import _common
import _train_worker
import compare
import testbed
import train_tf
import train_torch
from _train_worker import CLASSES, COLLECTIVES_SYSTEMS
from train_torch import DDP_TIMES, HOOKS, system_parts

HERE = Path(__file__).resolve().parent
# One training step each per round, in this order (rotated from round to round). "none" is
# the model without DDP: the step time without communication.
SYSTEMS = ("none", "gloo", "ring", "hierarchical", "reduction_server")
COMM_SYSTEMS = SYSTEMS[1:]
# --framework tf: TensorFlow's MultiWorkerMirroredStrategy ("mwms") in gloo's place.
TF_SYSTEMS = ("none", "mwms", "ring", "reduction_server")
BASELINES = {"torch": "gloo", "tf": "mwms"}  # the peer every row's ratio is to
LABELS = {"none": "no communication", "gloo": "gloo", "ring": "collectives ring",
          "hierarchical": "collectives hierarchical", "reduction_server": "collectives reduction_server",
          "mwms": "TF MultiWorkerMirroredStrategy (RING, gRPC)"}
# collectives.tf's op paths (COLLECTIVES_TF_OPS), each a run of its own, in this order.
TF_OPS = {"numpy": "tf.numpy_function", "custom": "custom op"}
MASTER_PORT = 29500  # on h0: torch's store (compare.RENDEZVOUS_PORT holds the reducers' store)
BAR = 1.45  # issue 13: reduction server >= 1.45x gloo samples/s at 4 workers + 4 reducers, 500 Mbit/s
COMPRESSED_BAR = 2.2  # issue 13: with fp16 compression through the reducers, >= 2.2x gloo (fp32)
# Issue 14, per collectives.tf op path: the reduction server >= 1.4x MultiWorkerMirroredStrategy's
# samples/s, the ring >= 1.0x it.
TF_BARS = {"reduction_server": 1.4, "ring": 1.0}
COMPRESSED = ("gloo", "reduction_server")  # the systems a --compress type adds a row of
WORKER_POLL_S = 0.5
parameter_count = _train_worker.parameter_count


def label(row):
    """A row's name in the table: "collectives reduction_server fp16 (fp16_compress_hook)";
    with TensorFlow "collectives ring (tf.numpy_function)", "no communication [numpy run]"."""
    compress = row.get("compress")
    name = LABELS[row["algorithm"]] + (f" {compress} ({HOOKS[compress]})" if compress else "")
    ops = row.get("tf_ops")
    if ops is None:
        return name
    return f"{name} ({TF_OPS[ops]})" if row["algorithm"] in COLLECTIVES_SYSTEMS else f"{name} [{ops} run]"


def speedup(row):
    """The row's paired ratio to its run's baseline (gloo, or TensorFlow's strategy): above 1 faster."""
    return row[f"speedup_vs_{row['baseline']}"]


def wire_bytes(row):
    """The bytes of one step's all-reduces: the gradients' S, half of it compressed to 16 bits."""
    return row["grad_bytes"] // 2 if row.get("compress") else row["grad_bytes"]


def _positive_numbers(text, option):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes a number or a comma-separated list, e.g. 25,64, not {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{option}: every value must be above 0, not {text!r}")
    return [int(v) if v == int(v) else v for v in values]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--framework", choices=("torch", "tf"), default="torch",
        help="torch: DDP over gloo and collectives (default); tf: Keras 3 tf.function steps with TensorFlow's "
        "MultiWorkerMirroredStrategy and collectives.tf (run it with a Python that has tensorflow)")
    add("--tf-ops", default=",".join(TF_OPS),
        help="with --framework tf: collectives.tf's op paths to time, a run each (COLLECTIVES_TF_OPS): numpy, "
        "custom; one the installed collectives.tf does not offer is left out with a note (default numpy,custom)")
    add("--hosts", type=int, default=4, help="worker hosts N, --per-host worker processes each (default 4)")
    add("--reducers", type=int,
        help="reducer hosts R beside them, one reducer each (default 4 on flat layouts, else 0; 0: no "
        "reduction-server row)")
    add("--per-host", type=int, default=1, metavar="K", help="worker processes per host (default 1)")
    add("--racks", type=int, metavar="R", help="spread the worker hosts over R racks behind uplinks (testbed.py)")
    add("--uplink-rate", metavar="RATE", help="with --racks: each rack uplink's rate, both directions")
    add("--no-hierarchical", dest="hierarchical", action="store_false",
        help="on a layout with shared hosts or racks, leave out the collectives hierarchical row")
    add("--rate", default="500mbit", help="each link's rate, both directions (default 500mbit)")
    add("--burst", default="256kb", help="tbf burst (default 256kb)")
    add("--tcp-cc", default="cubic", help="the hosts' TCP congestion control (default cubic; see testbed.py)")
    add("--bucket-cap-mb",
        help="DDP bucket_cap_mb, or a comma-separated list (default 25,64); with --framework tf one size, of "
        "collectives.tf's buckets and MultiWorkerMirroredStrategy's packs alike (default 25)")
    add("--compress", default="",
        help="also time gloo and the reduction server with gradients compressed to these types through torch's "
        "DDP hooks (fp16_compress_hook, bf16_compress_hook): fp16, bf16 or fp16,bf16 (default: none)")
    add("--steps", type=int, default=10, help="timed rounds: one step per system each (default 10)")
    add("--warmup", type=int, default=2, help="rounds before them, not counted (default 2)")
    add("--batch", type=int, default=32, help="samples per worker and step (default 32)")
    add("--width", type=int, default=2048, help="the MLP's width (default 2048; change only for tests)")
    add("--layers", type=int, default=6, help="its square layers (default 6; change only for tests)")
    add("--timeout", type=float, default=600.0, help="every process group's timeout, seconds (default 600)")
    add("--timeline", action="store_true",
        help="also time each step's traffic on the links (see above; the workers then do more work)")
    add("--json", metavar="FILE", help="write the result rows to FILE")
    add("--results", metavar="MD",
        help="also rewrite this run's generated block ('ddp N+R RATE') in MD (benchmarks/RESULTS.md)")
    # Set by the driver for the worker processes it starts on the hosts.
    add("--worker-report", metavar="FILE", help=argparse.SUPPRESS)
    add("--link", default=testbed.IFNAME, help=argparse.SUPPRESS)
    add("--placement", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hosts < 2:
        parser.error("--hosts must be at least 2 (DDP across the links needs 2 workers)")
    if args.per_host < 1:
        parser.error("--per-host must be at least 1")
    if (args.racks is None) != (args.uplink_rate is None):
        parser.error("--racks and --uplink-rate go together: racks behind uplinks of that rate")
    if args.racks is not None and not 2 <= args.racks <= args.hosts:
        parser.error(f"--racks must be at least 2 and at most --hosts ({args.hosts}), not {args.racks}")
    layered = args.per_host > 1 or args.racks is not None
    if args.reducers is None:
        args.reducers = 0 if layered else 4
    elif args.reducers > 0 and args.racks is not None:
        parser.error("--reducers runs on layouts without racks only (for now)")
    if args.reducers < 0:
        parser.error("--reducers must be 0 or more")
    if args.hosts + args.reducers > 250:
        parser.error("--hosts plus --reducers: the testbed has room for at most 250 hosts")
    for name in ("steps", "batch", "width", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.timeout <= 0:
        parser.error("--timeout must be above 0")
    tf = args.framework == "tf"
    if args.bucket_cap_mb is None:
        args.bucket_cap_mb = "25" if tf else "25,64"
    try:
        args.bucket_caps = _positive_numbers(args.bucket_cap_mb, "--bucket-cap-mb")
        testbed.parse_rate(args.rate)
        testbed.parse_burst(args.burst)
        if args.uplink_rate is not None:
            testbed.parse_rate(args.uplink_rate)
    except ValueError as e:
        parser.error(str(e))
    hierarchical = layered and args.hierarchical and (args.worker_report or compare.algorithm_available("hierarchical"))
    if layered and args.hierarchical and not hierarchical:
        print("# note: the installed collectives does not offer the hierarchical algorithm yet: no hierarchical "
              "row", file=sys.stderr)
    args.compress_types = [c for c in args.compress.split(",") if c]
    unknown = [c for c in args.compress_types if c not in HOOKS]
    if unknown:
        parser.error(f"--compress takes {' or '.join(HOOKS)} (comma-separated), not {', '.join(unknown)}")
    if tf:
        if layered or args.compress_types:
            parser.error("--framework tf runs one worker per host without racks, uncompressed: no --per-host, "
                         "--racks or --compress")
        if len(args.bucket_caps) > 1:
            parser.error("--framework tf takes one --bucket-cap-mb (the strategy's pack size is fixed per process)")
        args.tf_ops = [o for o in args.tf_ops.split(",") if o]
        if not args.tf_ops or set(args.tf_ops) - set(TF_OPS):
            parser.error(f"--tf-ops takes {' or '.join(TF_OPS)} (comma-separated), not {','.join(args.tf_ops)!r}")
        args.systems = [s for s in TF_SYSTEMS if s != "reduction_server" or args.reducers]
        return args
    args.systems = [s for s in SYSTEMS if (s != "reduction_server" or args.reducers)
                    and (s != "hierarchical" or hierarchical)]
    args.systems += [f"{s}+{c}" for c in args.compress_types for s in COMPRESSED if s in args.systems]
    return args


def layout_of(args):
    """The run's _checks.Layout (worker hosts only)."""
    racks = testbed.rack_sizes(args.hosts, args.racks) if args.racks else ()
    return _checks.Layout(args.hosts, args.per_host, racks, args.reducers)


# -- from the job's raw figures to rows

def comm_floor_s(algorithm, grad_bytes, goodput_GBps, hosts, reducers, layout=None, uplink_goodput_GBps=None):
    """The least time the gradients' all-reduce takes on links of goodput B: the bytes each
    worker host must move each way over B (ring and gloo: 2(n-1)/n x S; the reduction server:
    S / min(1, R/N)); on a layout, the plan's slowest level (host NICs at B, uplinks at B_up:
    _checks.plan_bound); 0 without communication."""
    if algorithm == "none":
        return 0.0
    limit = compare.bound(algorithm, goodput_GBps, hosts, reducers, layout, uplink_goodput_GBps)  # algbw, GB/s
    return grad_bytes / (limit * 1e9)


def _slowest(ranks, name, key):
    """Per round, the largest value over ranks."""
    return [max(values) for values in zip(*(r[name][key] for r in ranks))]


def _mean_over_ranks(ranks, name, key):
    return [statistics.fmean(values) for values in zip(*(r[name][key] for r in ranks))]


def rows_from_report(report, setting):
    """One row per (bucket cap, system) from the workers' report. setting: hosts, reducers,
    rate_gbps, goodput_GBps, tc, commit; on layouts also per_host, racks (worker hosts per
    rack), uplink_goodput_GBps, uplink_rate_gbps and worker_hosts (each rank's host). A
    TensorFlow job's report (framework "tf") names its baseline (the strategy), its
    collectives.tf op path and TensorFlow's version; its rows carry them."""
    rows = []
    framework = report.get("framework", "torch")
    baseline = BASELINES[framework]
    hosts, reducers = setting["hosts"], setting["reducers"]
    layout = _checks.Layout(hosts, setting.get("per_host") or 1, setting.get("racks") or (), reducers)
    uplink_goodput = setting.get("uplink_goodput_GBps")
    grad_bytes = report["params"] * 4
    for phase in report["phases"]:
        ranks = phase["ranks"]
        times = {name: _slowest(ranks, name, "step_s") for name in report["systems"]}
        none = statistics.median(times["none"]) if "none" in times else None
        for name in report["systems"]:
            described = report["algorithms"][name]  # the library's words: "hierarchical(2 ranks/host x 2 hosts)"
            algorithm = _checks.algorithm_name(described)
            plan = None if name == "none" else _checks.plan_of(described, layout)
            median = statistics.median(times[name])
            cpu = phase["cpu"][name]
            busy = sum(util * seconds for util, seconds in cpu)
            seconds = sum(seconds for _, seconds in cpu)
            cpu_util = busy / seconds if seconds else None
            hashes = [r[name].get("hash") for r in ranks]
            tx, rx = (statistics.median(_mean_over_ranks(ranks, name, key)) for key in ("tx", "rx"))
            names = setting.get("worker_hosts") or [f"rank {i}" for i in range(len(ranks))]
            # Ranks that share a host read the same counters: one figure per host.
            per_host = {host: {key: statistics.median(r[name][key]) for key in ("tx", "rx")}
                        for host, r in zip(names, ranks)}
            link_bytes = {"tx_per_step": tx, "rx_per_step": rx, "per_host": per_host}
            steps_uplinks = ranks[0][name].get("uplinks")  # worker 0's, per step
            if steps_uplinks:
                uplinks = {rack: {way: statistics.median(step[rack][i] for step in steps_uplinks)
                                  for i, way in enumerate(("tx", "rx"))} for rack in steps_uplinks[0]}
                link_bytes.update(uplinks=uplinks,
                                  tx_per_uplink=statistics.fmean(u["tx"] for u in uplinks.values()),
                                  rx_per_uplink=statistics.fmean(u["rx"] for u in uplinks.values()))
            base, compress = system_parts(name)
            row = {
                "system": ("collectives" if base in COLLECTIVES_SYSTEMS else "tensorflow" if base == "mwms"
                           else base),
                "framework": framework, "baseline": baseline,
                "algorithm": algorithm, "compress": compress, "hook": HOOKS.get(compress), "plan": plan, "hosts": hosts, "ranks": layout.ranks,
                "per_host": layout.per_host, "racks": list(layout.racks) or None, "reducers": reducers,
                "rate_gbps": setting["rate_gbps"], "goodput_GBps": setting["goodput_GBps"], "tc": setting["tc"],
                "bucket_cap_mb": phase["bucket_cap_mb"], "buckets_bytes": phase["buckets"].get(name),
                "params": report["params"], "grad_bytes": grad_bytes, "batch": report["batch"],
                "width": report["width"], "layers": report["layers"],
                "warmup": report["warmup"], "steps": report["steps"],
                "step_time_s": median, "step_times_s": times[name],
                "samples_per_s": layout.ranks * report["batch"] / median,
                f"speedup_vs_{baseline}": (_common.paired_ratio(times[baseline], times[name]) if baseline in times
                                           else None),
                "speedups": {other: _common.paired_ratio(times[other], times[name]) for other in report["systems"]
                             if other not in ("none", name)},
                "compute_time_s": none,
                "comm_share": None if none is None or name == "none" else 1 - none / median,
                "comm_floor_s": comm_floor_s(plan or algorithm, grad_bytes // 2 if compress else grad_bytes, setting["goodput_GBps"], hosts, reducers,
                                             layout, uplink_goodput),
                "link_bytes": link_bytes,
                "cpu_util": cpu_util,
                # Without communication the step is all compute: the CPU is its bottleneck by design.
                "cpu_bound": (None if name == "none"
                              else cpu_util is not None and cpu_util > testbed.CPU_BOUND_UTIL),
                "params_identical": None if name == "none" else len(set(hashes)) == 1 and None not in hashes,
                f"max_abs_diff_vs_{baseline}": (None if name == "none" or f"max_abs_diff_vs_{baseline}" not in ranks[0][name]
                                                else max(r[name][f"max_abs_diff_vs_{baseline}"] for r in ranks)),
                "commit": setting["commit"],
            }
            if described != algorithm:
                row["plan_detail"] = described
            if framework == "tf":
                row.update(tf_ops=report["tf_ops"], tf_ops_line=report.get("tf_ops_line"),
                           tensorflow=report["tensorflow"], keras=report["keras"])
            if layout.racks:
                row["uplink_rate_gbps"], row["uplink_goodput_GBps"] = setting.get("uplink_rate_gbps"), uplink_goodput
            for key in ("forward_s", "backward_s", "optimizer_s", *(DDP_TIMES if name != "none" else ())):
                if key in ranks[0][name]:  # TensorFlow's steps are timed whole
                    row[key] = statistics.median(_slowest(ranks, name, key))
            # How close DDP's all-reduces (first bucket's start to last one's end) came to the floor;
            # TensorFlow times no all-reduce of its own: the whole step's time stands for it (a
            # lower bound of how close).
            comm = row.get("ddp_backward_comm_s", median)
            row["bound_fraction"] = None if name == "none" or not comm else row["comm_floor_s"] / comm
            row["pace"] = _checks.pace(row["bound_fraction"], cpu_util)
            if name != "none" and "wire_out_s" in ranks[0][name]:
                row.update(_wire_times(ranks, name, times[name]))
            rows.append(row)
    return rows


WIRE_KEYS = ("wire_s", "before_wire_s", "after_wire_s", "sending_s")


def _wire_times(ranks, name, step_times):
    """--timeline: the medians over rounds of the step's time on the wire (the last worker's
    first bulk bytes out to the last bulk bytes in), of the time before it (from the step's
    start), of the time after it (to the slowest worker's end of the step), and of how long the
    last worker to start took to send (its first bulk bytes out to its last: the others could
    send only what the algorithm lets a worker send ahead of the slowest, so its sending is
    what the links' rate bounds)."""
    rounds = []
    for outs, out_ends, ins, step in zip(zip(*(r[name]["wire_out_s"] for r in ranks)),
                                         zip(*(r[name]["wire_out_end_s"] for r in ranks)),
                                         zip(*(r[name]["wire_in_s"] for r in ranks)), step_times):
        if None not in (*outs, *out_ends, *ins):
            last = outs.index(max(outs))
            rounds.append((max(ins) - max(outs), max(outs), step - max(ins), out_ends[last] - outs[last]))
    if not rounds:
        return dict.fromkeys(WIRE_KEYS)
    return {key: statistics.median(r[i] for r in rounds) for i, key in enumerate(WIRE_KEYS)}


def timeline_lines(rows):
    """--timeline: per system, its wire time against its floor and the step's time outside it;
    per bucket cap, the reduction server's ratio to gloo with both at their floors."""
    timed = [row for row in rows if row.get("wire_s") is not None]
    lines = [f"{label(row)} at bucket_cap_mb {row['bucket_cap_mb']:g}: on the wire {_ms(row['wire_s'])} ms "
             f"(floor {_ms(row['comm_floor_s'])}, {(row['wire_s'] - row['comm_floor_s']) * 1e3:+.0f} ms), "
             f"before it {_ms(row['before_wire_s'])} ms, after it {_ms(row['after_wire_s'])} ms; the last worker to "
             f"start sent for {_ms(row['sending_s'])} ms ({row['comm_floor_s'] / row['sending_s']:.1%} of the links' "
             f"goodput B)" for row in timed]
    for row in timed:
        gloo = next((r for r in timed if r["algorithm"] == "gloo" and not r.get("compress")
                     and r["bucket_cap_mb"] == row["bucket_cap_mb"]), None)
        if row["algorithm"] != "reduction_server" or row.get("compress") or gloo is None:
            continue
        outside = {r["algorithm"]: r["before_wire_s"] + r["after_wire_s"] for r in (row, gloo)}
        cap = (outside["gloo"] + gloo["comm_floor_s"]) / (outside["reduction_server"] + row["comm_floor_s"])
        lines.append(f"{label(row)} at bucket_cap_mb {row['bucket_cap_mb']:g}: with both it and gloo at their floors "
                     f"and these times outside the wire, {cap:.2f}x gloo")
    return lines


BASELINE_WORDS = {"gloo": "gloo", "mwms": "MultiWorkerMirroredStrategy"}


def _baseline_row(row, rows):
    """The row of the baseline (gloo, uncompressed; or TensorFlow's strategy) that `row` is
    paired with: the same bucket cap and, with TensorFlow, the same run."""
    return next(r for r in rows if r["algorithm"] == row["baseline"] and not r.get("compress")
                and r["bucket_cap_mb"] == row["bucket_cap_mb"] and r.get("tf_ops") == row.get("tf_ops"))


def _ratio_standing(row, rows):
    """Whether the row's ratio to its baseline counts, and why: _checks.ratio_standing."""
    return _checks.ratio_standing(label(row), row["pace"], BASELINE_WORDS[row["baseline"]],
                                  _baseline_row(row, rows)["pace"])


def standing_lines(rows):
    """Each collectives system's ratio to gloo or TensorFlow's strategy (and the hierarchical
    plan's to the flat ring), per bucket cap, and whether it counts."""
    lines = [f"{label(row)} {speedup(row):.2f}x {BASELINE_WORDS[row['baseline']]} at bucket_cap_mb "
             f"{row['bucket_cap_mb']:g}: {_ratio_standing(row, rows)[1]}"
             for row in rows if row["algorithm"] in COLLECTIVES_SYSTEMS or (row["algorithm"] == "gloo"
                                                                         and row.get("compress"))]
    for row in rows:
        ratio = (row.get("speedups") or {}).get("ring")
        if row["algorithm"] == "hierarchical" and ratio is not None:
            ring = next(r for r in rows if r["algorithm"] == "ring" and r["bucket_cap_mb"] == row["bucket_cap_mb"])
            words = _checks.ratio_standing(LABELS["hierarchical"], row["pace"], LABELS["ring"], ring["pace"])[1]
            lines.append(f"{LABELS['hierarchical']} {ratio:.2f}x {LABELS['ring']} at bucket_cap_mb "
                         f"{row['bucket_cap_mb']:g}: {words}")
    return lines


def _verdict(ratio, bar, counts, words):
    return "PASS" if ratio >= bar and counts else "FAIL" + ("" if counts else f" (the ratio {words})")


def bar_lines(rows):
    """The issues' bars in words, per bucket cap: with torch, the reduction server >= 1.45x
    gloo samples/s (with fp16 compression >= 2.2x gloo fp32); with TensorFlow, per op path,
    the reduction server >= 1.4x and the ring >= 1.0x MultiWorkerMirroredStrategy, and the
    custom op's samples/s not below the numpy_function's."""
    lines = []
    for row in rows:
        config = f"{row['hosts']} workers + {row['reducers']} reducer{'s' if row['reducers'] != 1 else ''}"
        if row["framework"] == "tf":
            if row["algorithm"] in TF_BARS:
                bar, (counts, words) = TF_BARS[row["algorithm"]], _ratio_standing(row, rows)
                lines.append(f"bar ({config}): {label(row)} {speedup(row):.2f}x MultiWorkerMirroredStrategy "
                             f"samples/s, need >= {bar}: {_verdict(speedup(row), bar, counts, words)}")
            continue
        if row["algorithm"] != "reduction_server" or row.get("compress") not in (None, "fp16"):
            continue
        counts, words = _ratio_standing(row, rows)
        bar = COMPRESSED_BAR if row.get("compress") else BAR
        compressed = f" with {row['compress']} compression ({row['hook']})" if row.get("compress") else ""
        lines.append(f"bar ({config}): reduction server{compressed} {speedup(row):.2f}x gloo samples/s at "
                     f"bucket_cap_mb {row['bucket_cap_mb']:g}, need >= {bar}: {_verdict(speedup(row), bar, counts, words)}")
    by_path = {(r["algorithm"], r.get("tf_ops")): r for r in rows if r["framework"] == "tf"}
    for algorithm in TF_BARS:
        numpy_row, custom_row = by_path.get((algorithm, "numpy")), by_path.get((algorithm, "custom"))
        if numpy_row and custom_row:
            ratio = custom_row["samples_per_s"] / numpy_row["samples_per_s"]
            lines.append(f"bar: {LABELS[algorithm]} through the custom op {ratio:.2f}x its samples/s through "
                         f"tf.numpy_function (runs one after the other: not paired), need >= 1.0: "
                         + ("PASS" if ratio >= 1.0 else "FAIL"))
    return lines


def path_lines(rows):
    """Per TensorFlow run, the op path collectives.tf said it used (its log line), and what is
    wrong: a line that names another path than the run's COLLECTIVES_TF_OPS."""
    lines, problems = [], []
    runs = {row["tf_ops"]: row.get("tf_ops_line") for row in rows if row["framework"] == "tf"}
    for ops, line in runs.items():
        lines.append(f"{ops} run (COLLECTIVES_TF_OPS={ops}): " + (
            f"collectives.tf logged '{line}'" if line else
            "collectives.tf logged no op path (one that has no custom op: tf.numpy_function)"))
        used = "custom" if line and "custom op" in line else "numpy"
        if used != ops:
            problems.append(f"the {ops} run used collectives.tf's {used} path: {line}")
    return lines, problems


def summary_lines(rows, notes=()):
    """The lines under a run's table: ratios, bars, op paths, notes."""
    return [*standing_lines(rows), *bar_lines(rows), *timeline_lines(rows), *path_lines(rows)[0], *notes]


def heading(first, rows=None):
    """The lines that head a run's table: hosts (the layout), tc, goodput, plans, model, workload."""
    n, r = first["hosts"], first["reducers"]
    layout = _checks.Layout.of_row(first)
    uplink = first.get("uplink_goodput_GBps")
    where = (f"{layout.describe()}: {layout.ranks} workers, rank-order (rank i on host i // {layout.per_host})"
             if layout.shared else f"{n} worker hosts" + (f" + {r} reducer host{'s' if r > 1 else ''}" if r else ""))
    plans = []
    for row in rows or []:
        if row["algorithm"] != "none" and row["bucket_cap_mb"] == first["bucket_cap_mb"] and layout.shared:
            models = _checks.level_models(row["plan"], layout)
            plans.append(f"{label(row)} ({row['plan']}) moves " + ", ".join(
                f"{'' if model[1] else '>= '}{model[0]:.3f} x S per {level} each way"
                for level, model in (("host NIC", models["host"]), ("uplink", models["uplink"])) if model is not None))
    if first["framework"] == "tf":
        runs = sorted({row["tf_ops"] for row in rows or [first]}, key=list(TF_OPS).index)
        how = (f"TensorFlow {first['tensorflow']}, Keras {first['keras']}: each step one tf.function, the "
               "collectives rows through DistributedGradientTape (buckets of the size above), the strategy's "
               "through Keras' optimizer (packs of that size); one run (job) per collectives.tf op path "
               f"(COLLECTIVES_TF_OPS={', '.join(runs)}), the strategy in the same processes as collectives, the "
               "systems alternating step by step within each run; floor/comm: the floor over the whole step "
               "(TensorFlow times no all-reduce apart)")
    else:
        how = "the systems alternating step by step"
    lines = [f"{where}; {first['tc']}",
             f"goodput B = {first['goodput_GBps'] * 8e3:.1f} Mbit/s per link and direction"
             + (f"; B_up = {uplink * 8e3:.1f} Mbit/s per rack uplink and direction" if uplink else ""),
             *plans,
             f"model: MLP, {first['layers']} x {first['width']}x{first['width']} + classifier ({CLASSES}), "
             f"{first['params'] / 1e6:.1f} M parameters = {first['grad_bytes'] / 1e6:.1f} MB of float32 gradients "
             f"(S); batch {first['batch']} per worker, SGD; {first['steps']} timed rounds after {first['warmup']} "
             f"warm-up, {how}"]
    return lines


def _ms(value):
    return "-" if value is None else f"{value * 1e3:.0f}"


def _cells(row, names):
    """The table's cells of one row, for the columns `names`."""
    ratio, share, link = speedup(row), row["comm_share"], row["link_bytes"]
    cells = {
        "system": label(row), "bucket MB": f"{row['bucket_cap_mb']:g}", "step ms": _ms(row["step_time_s"]),
        "samples/s": f"{row['samples_per_s']:.1f}", "comm share": "-" if share is None else f"{share:.0%}",
        "comm floor ms": _ms(row["comm_floor_s"]), "tx/S": f"{link['tx_per_step'] / row['grad_bytes']:.3f}",
        "rx/S": f"{link['rx_per_step'] / row['grad_bytes']:.3f}",
        "cpu": "-" if row["cpu_util"] is None else format(row["cpu_util"], ".0%"),
        "floor/comm": "-" if row["bound_fraction"] is None else format(row["bound_fraction"], ".0%"),
        "pace": row["pace"] or "-", "params identical": {True: "yes", False: "NO", None: "-"}[row["params_identical"]],
    }
    cells[f"vs {BASELINE_WORDS[row['baseline']]}"] = "-" if ratio is None else f"{ratio:.2f}x"
    if row["framework"] == "torch":
        cells["fwd/bwd/opt ms"] = f"{_ms(row['forward_s'])}/{_ms(row['backward_s'])}/{_ms(row['optimizer_s'])}"
        cells["DDP bwd compute/comm/overlap ms"] = (
            "-" if row["algorithm"] == "none" else
            f"{_ms(row['ddp_backward_compute_s'])}/{_ms(row['ddp_backward_comm_s'])}/{_ms(row['ddp_overlap_s'])}")
    if row.get("racks"):
        cells["uplink tx/S"] = _share(link.get("tx_per_uplink"), row)
        cells["uplink rx/S"] = _share(link.get("rx_per_uplink"), row)
    return [cells[name] for name in names]


def _share(value, row):
    return "-" if value is None else f"{value / row['grad_bytes']:.3f}"


COLUMNS = ("system", "bucket MB", "step ms", "samples/s", "vs gloo", "comm share", "fwd/bwd/opt ms",
           "DDP bwd compute/comm/overlap ms", "comm floor ms", "tx/S", "rx/S", "cpu", "floor/comm", "pace",
           "params identical")
TF_COLUMNS = tuple("vs MultiWorkerMirroredStrategy" if c == "vs gloo" else c for c in COLUMNS
                   if c not in ("fwd/bwd/opt ms", "DDP bwd compute/comm/overlap ms"))  # TF's steps are timed whole


def columns(rows):
    """COLUMNS (TF_COLUMNS for TensorFlow), with each uplink's (mean) bytes per step over S after
    rx/S where there are racks."""
    names = TF_COLUMNS if rows[0]["framework"] == "tf" else COLUMNS
    if not rows[0].get("racks"):
        return names
    at = names.index("rx/S") + 1
    return names[:at] + ("uplink tx/S", "uplink rx/S") + names[at:]


def print_rows(rows, notes=()):
    for line in heading(rows[0], rows):
        print("# " + line)
    names = columns(rows)
    table = [list(names)] + [_cells(row, names) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(names))]
    for index, line in enumerate(table):
        text = "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        print(("# " if index == 0 else "  ") + text)
    for line in [_checks.PACE_LEGEND, *summary_lines(rows, notes)]:
        print("# " + line)


def reducer_lines(rows):
    """A line per reducer host of each job of the run (with TensorFlow one per op path): its
    link's bytes over the whole job (every bucket size, warm-up included), its CPU use and how
    it ended."""
    jobs = {}
    for row in rows:
        if row.get("reducer_hosts"):
            jobs.setdefault(row.get("tf_ops"), row["reducer_hosts"])
    lines = []
    for ops, info in jobs.items():
        for host, figures in sorted(info.items(), key=lambda item: int(item[0][1:])):
            totals = figures.get("totals") or {}
            lines.append(("" if ops is None else f"{ops} run: ")
                         + f"{host} (reducer {figures['index']}): {figures['link_bytes']['rx'] / 1e6:.0f} MB in, "
                         f"{figures['link_bytes']['tx'] / 1e6:.0f} MB out over its link during the job; "
                         f"{compare.reducer_cpu(totals)}; outcome {figures['outcome']}")
    return lines


def block_name(hosts, reducers, rate, per_host=1, racks=None, uplink_rate=None, framework="torch"):
    """The RESULTS.md block a run writes: 'ddp 4+4 500mbit'; on layouts 'ddp 4x2 500mbit',
    'ddp 4x2+4 500mbit' (with 4 reducers), 'ddp 4x2 racks 2 uplink 250mbit 500mbit'; with
    TensorFlow 'tf 4+4 500mbit'."""
    if framework == "tf":
        return f"tf {hosts}+{reducers} {rate}"
    if per_host > 1 or racks:
        return (f"ddp {hosts}x{per_host}" + (f"+{reducers}" if reducers else "")
                + (f" racks {racks} uplink {uplink_rate}" if racks else "") + f" {rate}")
    return f"ddp {hosts}+{reducers} {rate}"


def markdown(rows, command, name, notes=()):
    """This run as a RESULTS.md block: the command, the date, the commit, the table, the bar
    and the notes."""
    names = columns(rows)
    lines = ["; ".join(heading(rows[0], rows)), "",
             "| " + " | ".join(names) + " |", "| --- " + "| ---: " * (len(names) - 1) + "|"]
    lines += ["| " + " | ".join(_cells(row, names)) + " |" for row in rows]
    lines += ["", _checks.PACE_LEGEND + ".", ""] + [f"- {line}" for line in summary_lines(rows, notes)]
    buckets = sorted({(r["bucket_cap_mb"], tuple(r["buckets_bytes"])) for r in rows
                      if r["algorithm"] != "none" and r["buckets_bytes"]})
    lines += [f"- DDP's buckets at bucket_cap_mb {cap:g}: " + ", ".join(f"{b / 1e6:.1f}" for b in sizes) + " MB"
              for cap, sizes in buckets]
    lines += [f"- {line}" for line in reducer_lines(rows)]
    return compare.generated_block(name, "train.py", rows[0]["commit"], command, lines + [""])


# -- the driver

def _tail(path, lines=25):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_job(bed, args, tf_ops=None):
    """The workers on the first N hosts, a reducer on each of the next R; (the workers'
    report, the reducers' figures, the link bytes of every host over the job). With
    TensorFlow, tf_ops is collectives.tf's op path (COLLECTIVES_TF_OPS) and each worker gets
    TF_CONFIG naming every worker host's address."""
    workers, reducers = args.hosts, args.reducers
    with tempfile.TemporaryDirectory(prefix="cc-train-") as work:
        os.chmod(work, 0o755)
        # The torch backend authenticates its connections also without reducers: a secret always.
        job = (compare.reducer_job_env(bed, work, reducers) if reducers
               else {"COLLECTIVES_TOKEN_FILE": str(compare.secret_file(work))})
        env = {**compare.base_env(), **bed.env(), **compare.PINNED_ENV, **job, "PYTHONUNBUFFERED": "1"}
        if tf_ops is not None:
            env = {"TF_CPP_MIN_LOG_LEVEL": "2", **env, train_tf.OPS_ENV: tf_ops}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TF_CONFIG"):
            env.pop(key, None)
        layout = layout_of(args)
        rank_hosts, rank_racks = layout.rank_hosts(bed.hosts[:workers]), layout.rank_racks()
        report_file, placement = Path(work) / "report.json", Path(work) / "placement"
        placement.mkdir()
        command = [sys.executable, str(HERE / "train.py"), "--framework", args.framework, "--worker-report", str(report_file),
                   "--link", testbed.IFNAME, "--placement", str(placement), "--hosts", str(workers),
                   "--reducers", str(reducers),
                   "--bucket-cap-mb", ",".join(f"{c:g}" for c in args.bucket_caps), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--width", str(args.width),
                   "--layers", str(args.layers), "--timeout", str(args.timeout), "--per-host", str(args.per_host),
                   "--compress", ",".join(args.compress_types), *(["--timeline"] if args.timeline else []),
                   *(["--racks", str(args.racks), "--uplink-rate", args.uplink_rate] if args.racks else []),
                   *([] if "hierarchical" in args.systems else ["--no-hierarchical"])]
        started, procs, logs = [], [], []
        links_before = bed.link_bytes()
        try:
            if reducers:
                compare.start_reducers(bed, bed.hosts[workers:workers + reducers], job["COLLECTIVES_RENDEZVOUS"],
                                       env, work, started)
            for rank, host in enumerate(rank_hosts):  # K consecutive ranks per host
                torchrun = {"RANK": str(rank), "WORLD_SIZE": str(layout.ranks), "LOCAL_RANK": str(rank % args.per_host),
                            "LOCAL_WORLD_SIZE": str(args.per_host), "GROUP_RANK": str(rank // args.per_host),
                            "MASTER_ADDR": bed.hosts[0].address, "MASTER_PORT": str(MASTER_PORT)}
                if tf_ops is not None:
                    torchrun["TF_CONFIG"] = train_tf.tf_config([h.address for h in rank_hosts], rank)
                log = Path(work) / f"worker-{rank}-{host.name}.log"
                logs.append(log)
                with open(log, "wb") as out:  # worker 0 writes its progress to this process's stdout
                    procs.append(bed.run_on(host, command, env={**env, **torchrun}, cwd=work,
                                            stdin=subprocess.DEVNULL, stdout=None if rank == 0 else out,
                                            stderr=None if rank == 0 else subprocess.STDOUT))
            placed = False
            while True:
                placed = placed or _checks.placement_verified(placement, rank_hosts, rank_racks)
                codes = [proc.poll() for proc in procs]
                failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
                if failed:
                    compare.stop_process(*procs)
                    for i in failed:
                        if i:
                            print(f"# worker {i} on {rank_hosts[i].name} (exit {codes[i]}), its log's end:\n"
                                  f"{_tail(logs[i])}", file=sys.stderr)
                    compare.print_reducer_logs(started)
                    raise SystemExit(f"the training job failed: worker{'s' if len(failed) > 1 else ''} "
                                     f"{', '.join(map(str, failed))} exited with "
                                     f"{', '.join(str(codes[i]) for i in failed)}")
                if all(code == 0 for code in codes):
                    break
                time.sleep(WORKER_POLL_S)
            _checks.require_placement(placement, rank_hosts, rank_racks)
            compare.finish_reducers(started)
        finally:
            compare.stop_process(*procs)
            compare.stop_reducers(started)
        links = testbed.link_bytes_delta(links_before, bed.link_bytes())
        return json.loads(report_file.read_text()), compare.reducer_figures(started, links)


def setting_of(bed, args):
    layout = layout_of(args)
    setting = {"hosts": args.hosts, "reducers": args.reducers, "rate_gbps": bed.rate_bps / 1e9,
               "goodput_GBps": bed.goodput_bps / 8 / 1e9, "tc": bed.tc_description(), "commit": _common.git_commit(),
               "worker_hosts": [h.name for h in layout.rank_hosts(bed.hosts[:args.hosts])],
               "per_host": args.per_host, "racks": list(layout.racks) or None}
    if bed.racks:
        setting.update(uplink_rate_gbps=bed.uplink_rate_bps / 1e9,
                       uplink_goodput_GBps=bed.uplink_goodput_bps / 8 / 1e9 if bed.uplink_goodput_bps else None)
    return setting


def link_problems(rows, reducer_info):
    """What is wrong with the run's link bytes against the models (benchmarks/_checks.py): each
    worker host's per step of each communicating row (the model times the gradients' bytes S;
    the smallest bucket decides whether an upper limit applies), and each reducer host's over
    the job per reduction-server step (every round of every bucket cap, warm-up included)."""
    problems = []
    for row in rows:
        if row["algorithm"] == "none":
            continue
        layout = _checks.Layout.of_row(row)
        models = _checks.level_models(row.get("plan") or _checks.plan_of(row["algorithm"], layout), layout)
        worker_model = models["host"]
        what = f"{label(row)} per step at bucket_cap_mb {row['bucket_cap_mb']:g}"
        # DDP's bucket sizes are the float32 gradients'; a compressing hook sends half of each.
        smallest = min(row["buckets_bytes"] or [row["grad_bytes"]]) * wire_bytes(row) // row["grad_bytes"]
        per_host = row["link_bytes"]["per_host"]
        if len(per_host) != layout.hosts:
            problems.append(f"{what}: link bytes of {len(per_host)} distinct hosts "
                            f"({', '.join(sorted(per_host)) or 'none'}), expected {layout.hosts}")
        problems += _checks.traffic_problems(what, per_host, worker_model, wire_bytes(row), layout.ranks, smallest)
        if models["uplink"] is not None:
            uplinks = row["link_bytes"].get("uplinks") or {}
            if len(uplinks) != len(layout.racks):
                problems.append(f"{what}: byte counts of {len(uplinks)} rack uplinks, expected {len(layout.racks)}")
            problems += _checks.traffic_problems(f"{what} (rack uplink)", uplinks, models["uplink"],
                                                 wire_bytes(row), layout.ranks, smallest)
    served = [r for r in rows if r["algorithm"] == "reduction_server"]
    if served and reducer_info:
        # In full-size steps: a compressed step moves half the bytes.
        steps = sum((r["warmup"] + r["steps"]) * wire_bytes(r) / r["grad_bytes"] for r in served)
        per_step = {host: {way: info["link_bytes"][way] / steps for way in ("tx", "rx")}
                    for host, info in reducer_info.items()}
        first = served[0]
        _, reducer_model = _checks.link_model("reduction_server", first["hosts"], first["reducers"])
        problems += _checks.traffic_problems("collectives reduction_server (reducer host, per step over the job)",
                                             per_step, reducer_model, first["grad_bytes"], first["hosts"],
                                             min(b * wire_bytes(r) // r["grad_bytes"]
                                                 for r in served for b in (r["buckets_bytes"] or [r["grad_bytes"]])))
    return problems


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker_report:
        (train_tf if args.framework == "tf" else train_torch).worker(args)
        return
    signal.signal(signal.SIGTERM, _interrupt)  # cleaned up as after Ctrl-C
    runs, notes = [None], []
    if args.framework == "tf":  # a job per collectives.tf op path
        if importlib.util.find_spec("tensorflow") is None:
            raise SystemExit(f"--framework tf: {sys.executable} has no tensorflow: run train.py with a Python that has "
                             "it and collectives (scripts/setup-venv .venv-tf test,tf makes one: .venv-tf/bin/python)")
        probe_env = {key: value for key, value in compare.base_env().items()
                     if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TF_CONFIG")}
        runs, notes = train_tf.offered_ops(args.tf_ops, probe_env)
        for note in notes:
            print(f"# note: {note}", file=sys.stderr)
        if not runs:
            raise SystemExit("none of the collectives.tf op paths asked for (--tf-ops) runs here: " + "; ".join(notes))
    with testbed.Testbed(hosts=args.hosts + args.reducers, rate=args.rate, burst=args.burst,
                         tcp_cc=args.tcp_cc, per_host=args.per_host, racks=args.racks,
                         uplink_rate=args.uplink_rate) as bed:
        jobs = [run_job(bed, args, tf_ops) for tf_ops in runs]
        setting = setting_of(bed, args)
    rows, problems = [], []
    for report, reducer_info in jobs:
        job_rows = rows_from_report(report, setting)
        for row in job_rows:
            if row["algorithm"] == "reduction_server":
                row["reducer_hosts"] = reducer_info
        problems += link_problems(job_rows, reducer_info)
        rows += job_rows
    _checks.check_traffic(problems)
    mixed = path_lines(rows)[1]
    if mixed:
        raise SystemExit("collectives.tf ran another op path than asked: " + "; ".join(mixed))
    print_rows(rows, notes)
    for line in reducer_lines(rows):
        print("# " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"# wrote {len(rows)} rows to {args.json}")
    if args.results:
        name = block_name(args.hosts, args.reducers, args.rate, args.per_host, args.racks, args.uplink_rate,
                          args.framework)
        command = "python benchmarks/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        compare.update_results(args.results, markdown(rows, command, name, notes), name, "train.py")
        print(f"# rewrote the '{name}' block of {args.results}")
    if any(row["params_identical"] is False for row in rows):
        raise SystemExit("the parameters differ across ranks for "
                         + ", ".join(label(r) for r in rows if r["params_identical"] is False))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("# interrupted; the workers and reducers were stopped and the testbed removed", file=sys.stderr)
        sys.exit(130)
