"""DDP training throughput on the emulated cluster: torch gloo, collectives ring and the
collectives reduction server, on the same hosts, rate, model and run (issue 5).

    python benchmarks/train.py --hosts 4 --reducers 4 --rate 500mbit [--bucket-cap-mb 25,64] [--steps K]
        [--compress fp16[,bf16]]
        [--json F] [--results benchmarks/RESULTS.md]
    python benchmarks/train.py --per-host 2 --hosts 4 [--racks 2 --uplink-rate 250mbit] --rate 500mbit ...

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
Per system a line gives its median, the floor, and the step's time before the wire (forward
and the backward pass up to the first bucket, on the slowest worker) and after it (DDP's
finishing and the optimizer), and the ratio to gloo that the reduction server would reach with
both systems at their floors and those times.

--results MD rewrites the block "ddp N+R RATE" (on layouts "ddp NxK RATE", "ddp NxK racks R
uplink RATE RATE") of MD (benchmarks/RESULTS.md) between
    <!-- train.py: begin NAME (generated; rerun the command below to regenerate) -->
    <!-- train.py: end NAME -->
Run as root (it creates network namespaces).
"""

import argparse
import datetime
import hashlib
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
import compare
import testbed

HERE = Path(__file__).resolve().parent
# One training step each per round, in this order (rotated from round to round). "none" is
# the model without DDP: the step time without communication.
SYSTEMS = ("none", "gloo", "ring", "hierarchical", "reduction_server")
COMM_SYSTEMS = SYSTEMS[1:]
COLLECTIVES_SYSTEMS = ("ring", "hierarchical", "reduction_server")
LABELS = {"none": "no communication", "gloo": "gloo", "ring": "collectives ring",
          "hierarchical": "collectives hierarchical", "reduction_server": "collectives reduction_server"}
MASTER_PORT = 29500  # on h0: torch's store (compare.RENDEZVOUS_PORT holds the reducers' store)
LEARNING_RATE = 0.01
CLASSES = 16
BAR = 1.45  # issue 13: reduction server >= 1.45x gloo samples/s at 4 workers + 4 reducers, 500 Mbit/s
COMPRESSED_BAR = 2.2  # issue 13: with fp16 compression through the reducers, >= 2.2x gloo (fp32)
# --compress: torch's own DDP communication hooks, which cast each bucket to the half type,
# all-reduce it (the reducers sum it in float32 and round once) and cast it back.
HOOKS = {"fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook"}
COMPRESSED = ("gloo", "reduction_server")  # the systems a --compress type adds a row of
WORKER_POLL_S = 0.5
# DDP's runtime logging (nanoseconds), sampled every step: the backward pass's compute, its
# all-reduces (first bucket's start to last bucket's end) and how much of them overlapped.
DDP_TIMES = {"ddp_backward_compute_s": "backward_compute_time", "ddp_backward_comm_s": "backward_comm_time",
             "ddp_overlap_s": "backward_compute_comm_overlap_time"}


def system_parts(name):
    """A system's key split: "reduction_server+fp16" -> ("reduction_server", "fp16"); "gloo" -> ("gloo", None)."""
    base, _, compress = name.partition("+")
    return base, compress or None


def label(row):
    """A row's name in the table: "collectives reduction_server fp16 (fp16_compress_hook)"."""
    compress = row.get("compress")
    return LABELS[row["algorithm"]] + (f" {compress} ({HOOKS[compress]})" if compress else "")


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
    add("--bucket-cap-mb", default="25,64", help="DDP bucket_cap_mb, or a comma-separated list (default 25,64)")
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
    args.systems = [s for s in SYSTEMS if (s != "reduction_server" or args.reducers)
                    and (s != "hierarchical" or hierarchical)]
    args.systems += [f"{s}+{c}" for c in args.compress_types for s in COMPRESSED if s in args.systems]
    return args


def layout_of(args):
    """The run's _checks.Layout (worker hosts only)."""
    racks = testbed.rack_sizes(args.hosts, args.racks) if args.racks else ()
    return _checks.Layout(args.hosts, args.per_host, racks, args.reducers)


def parameter_count(width, layers, classes=CLASSES):
    """The MLP's parameters: `layers` square layers with biases, then the classifier."""
    return layers * (width * width + width) + width * classes + classes


# -- the worker: one process per worker host

def worker(args):
    """One worker of the job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment);
    worker 0 writes the job's raw figures to --worker-report."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import collectives.torch  # noqa: F401 - registers the backend "collectives"

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.placement:
        _checks.report_placement(args.placement, int(os.environ["RANK"]), args.link)
    dist.init_process_group("gloo", timeout=timeout)
    rank, size = dist.get_rank(), dist.get_world_size()
    systems = args.systems
    groups = {}
    # The first collectives group that spans the job gets its reducers; the ring row runs a
    # subgroup of it over the same connections, forced to the ring at every size (auto would
    # take recursive doubling for small buckets, whose link bytes differ).
    world = dist.new_group(backend="collectives", timeout=timeout)
    if "reduction_server" in systems:
        groups["reduction_server"] = world
    for name in ("ring", "hierarchical"):
        if name in systems:  # a subgroup spanning the job, forced to the algorithm
            groups[name] = dist.new_group(backend="collectives", timeout=timeout, pg_options=world.communicator
                                          .create_group(list(range(size)), algorithm=name))
    groups["gloo"] = dist.new_group(backend="gloo", timeout=timeout)
    algorithms = {"gloo": "gloo", "none": "none"}
    for name in COLLECTIVES_SYSTEMS:
        if name in groups:
            # The library's words for what runs: "ring", or the plan, "hierarchical(2 ranks/host x 2 hosts)".
            algorithms[name] = groups[name].communicator.algorithm
            if _checks.algorithm_name(algorithms[name]) != name:
                raise RuntimeError(f"the collectives group meant for {name} runs {algorithms[name]}")
    for name in systems:
        algorithms[name] = algorithms[system_parts(name)[0]]
    # With racks, worker 0 also reads the uplinks' counters (in the switch's namespace).
    switch = os.environ.get("TESTBED_SWITCH_PID", "") if rank == 0 and args.racks else ""

    def build_model():
        torch.manual_seed(0)  # every system and every rank: the same initial parameters
        layers = []
        for _ in range(args.layers):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(args.width, CLASSES))

    generator = torch.Generator().manual_seed(1000 + rank)  # each worker its own fixed batch
    inputs = torch.randn(args.batch, args.width, generator=generator)
    targets = torch.randint(0, CLASSES, (args.batch,), generator=generator)

    def train_step(module, optimizer):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(inputs), targets)
        forward = time.perf_counter()
        loss.backward()  # DDP: returns once every bucket's all-reduce is done
        backward = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        return {"step_s": end - start, "forward_s": forward - start, "backward_s": backward - forward,
                "optimizer_s": end - backward}

    def parameters(model):
        return [p.detach() for p in model.parameters()]

    phases = []
    for cap in args.bucket_caps:
        models = {name: build_model() for name in systems}
        runners = {"none": models["none"]}
        for name in systems[1:]:
            base, compress = system_parts(name)
            runners[name] = DDP(models[name], process_group=groups[base], bucket_cap_mb=cap, init_sync=False)
            if compress:
                runners[name].register_comm_hook(groups[base], getattr(default_hooks, HOOKS[compress]))
            runners[name]._set_ddp_runtime_logging_sample_rate(1)
        optimizers = {name: torch.optim.SGD(models[name].parameters(), lr=LEARNING_RATE) for name in systems}
        record = {name: {} for name in systems}
        cpu = {name: [] for name in systems}
        for round_ in range(args.warmup + args.steps):
            turn, last = round_ % len(systems), {}
            for name in systems[turn:] + systems[:turn]:
                # The link counters are read before the barrier (once a worker leaves it, its
                # bytes may reach a host whose worker has not) and after another (every
                # worker's step is done, so every byte of it has crossed), as allreduce.py does.
                link = _common.link_counters(args.link)
                uplinks = testbed.uplink_counters(switch) if switch else None
                dist.barrier()
                sampler = testbed.CpuSampler().start()
                timeline = _common.LinkTimeline(args.link).start() if args.timeline else None
                figures = train_step(runners[name], optimizers[name])
                sampler.stop()
                if timeline:
                    timeline.stop()
                    figures["wire_out_s"], figures["wire_in_s"] = timeline.out_s, timeline.in_s
                dist.barrier()
                link_after = _common.link_counters(args.link)
                uplinks_after = testbed.uplink_counters(switch) if switch else None
                last[name] = figures["step_s"]
                if round_ < args.warmup:
                    continue
                figures["tx"], figures["rx"] = link_after[0] - link[0], link_after[1] - link[1]
                if uplinks is not None:
                    figures["uplinks"] = {rack: [out - uplinks[rack][0], into - uplinks[rack][1]]
                                          for rack, (out, into) in uplinks_after.items()}
                if name != "none":
                    logged = runners[name]._get_ddp_logging_data()
                    figures.update({key: logged.get(field, 0) / 1e9 for key, field in DDP_TIMES.items()})
                for key, value in figures.items():
                    record[name].setdefault(key, []).append(value)
                cpu[name].append([sampler.util, figures["step_s"]])
            if rank == 0:
                print(f"# bucket_cap_mb {cap:g}, {'warm-up ' if round_ < args.warmup else ''}round "
                      f"{round_ + 1 - (0 if round_ < args.warmup else args.warmup)}, rank 0's steps: "
                      + ", ".join(f"{name} {last[name]:.3f} s" for name in systems), flush=True)
        gloo_params = parameters(models["gloo"])
        for name in systems[1:]:
            digest = hashlib.sha256()
            for p in parameters(models[name]):
                digest.update(p.contiguous().numpy())
            record[name]["hash"] = digest.hexdigest()
            record[name]["max_abs_diff_vs_gloo"] = max(
                float((a - b).abs().max()) for a, b in zip(parameters(models[name]), gloo_params))
        buckets = {name: [int(b) for b in str(runners[name]._get_ddp_logging_data().get("rebuilt_bucket_sizes", ""))
                          .replace(",", " ").split()] for name in systems[1:]}
        everyone = [None] * size
        dist.all_gather_object(everyone, record)
        phases.append({"bucket_cap_mb": cap, "buckets": buckets, "ranks": everyone, "cpu": cpu})
        del runners, models, optimizers
    if rank == 0:
        report = {"world": size, "systems": systems, "algorithms": algorithms,
                  "params": parameter_count(args.width, args.layers), "width": args.width, "layers": args.layers,
                  "classes": CLASSES, "batch": args.batch, "lr": LEARNING_RATE, "warmup": args.warmup,
                  "steps": args.steps, "phases": phases}
        Path(args.worker_report).write_text(json.dumps(report) + "\n")
    dist.destroy_process_group()


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
    rack), uplink_goodput_GBps, uplink_rate_gbps and worker_hosts (each rank's host)."""
    rows = []
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
                "system": "collectives" if base in COLLECTIVES_SYSTEMS else base,
                "algorithm": algorithm, "compress": compress, "hook": HOOKS.get(compress), "plan": plan, "hosts": hosts, "ranks": layout.ranks,
                "per_host": layout.per_host, "racks": list(layout.racks) or None, "reducers": reducers,
                "rate_gbps": setting["rate_gbps"], "goodput_GBps": setting["goodput_GBps"], "tc": setting["tc"],
                "bucket_cap_mb": phase["bucket_cap_mb"], "buckets_bytes": phase["buckets"].get(name),
                "params": report["params"], "grad_bytes": grad_bytes, "batch": report["batch"],
                "width": report["width"], "layers": report["layers"],
                "warmup": report["warmup"], "steps": report["steps"],
                "step_time_s": median, "step_times_s": times[name],
                "samples_per_s": layout.ranks * report["batch"] / median,
                "speedup_vs_gloo": (_common.paired_ratio(times["gloo"], times[name]) if "gloo" in times else None),
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
                "max_abs_diff_vs_gloo": None if name == "none" else max(r[name]["max_abs_diff_vs_gloo"] for r in ranks),
                "commit": setting["commit"],
            }
            if described != algorithm:
                row["plan_detail"] = described
            if layout.racks:
                row["uplink_rate_gbps"], row["uplink_goodput_GBps"] = setting.get("uplink_rate_gbps"), uplink_goodput
            for key in ("forward_s", "backward_s", "optimizer_s", *(DDP_TIMES if name != "none" else ())):
                row[key] = statistics.median(_slowest(ranks, name, key))
            # How close DDP's all-reduces (first bucket's start to last one's end) came to the floor.
            row["bound_fraction"] = (None if name == "none" or not row["ddp_backward_comm_s"]
                                     else row["comm_floor_s"] / row["ddp_backward_comm_s"])
            row["pace"] = _checks.pace(row["bound_fraction"], cpu_util)
            if name != "none" and "wire_out_s" in ranks[0][name]:
                row.update(_wire_times(ranks, name, times[name]))
            rows.append(row)
    return rows


def _wire_times(ranks, name, step_times):
    """--timeline: the medians over rounds of the step's time on the wire (the last worker's
    first bulk bytes out to the last bulk bytes in), of the time before it (from the step's
    start) and of the time after it (to the slowest worker's end of the step)."""
    rounds = []
    for outs, ins, step in zip(zip(*(r[name]["wire_out_s"] for r in ranks)),
                               zip(*(r[name]["wire_in_s"] for r in ranks)), step_times):
        if None not in (*outs, *ins):
            rounds.append((max(ins) - max(outs), max(outs), step - max(ins)))
    if not rounds:
        return {"wire_s": None, "before_wire_s": None, "after_wire_s": None}
    return {key: statistics.median(r[i] for r in rounds)
            for i, key in enumerate(("wire_s", "before_wire_s", "after_wire_s"))}


def timeline_lines(rows):
    """--timeline: per system, its wire time against its floor and the step's time outside it;
    per bucket cap, the reduction server's ratio to gloo with both at their floors."""
    timed = [row for row in rows if row.get("wire_s") is not None]
    lines = [f"{label(row)} at bucket_cap_mb {row['bucket_cap_mb']:g}: on the wire {_ms(row['wire_s'])} ms "
             f"(floor {_ms(row['comm_floor_s'])}, {(row['wire_s'] - row['comm_floor_s']) * 1e3:+.0f} ms), "
             f"before it {_ms(row['before_wire_s'])} ms, after it {_ms(row['after_wire_s'])} ms" for row in timed]
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


def _ratio_standing(row, rows):
    """Whether the row's ratio to gloo (at its bucket cap) counts, and why: _checks.ratio_standing."""
    gloo = next(r for r in rows if r["algorithm"] == "gloo" and not r.get("compress")
                and r["bucket_cap_mb"] == row["bucket_cap_mb"])
    return _checks.ratio_standing(label(row), row["pace"], "gloo", gloo["pace"])


def standing_lines(rows):
    """Each collectives system's ratio to gloo (and the hierarchical plan's to the flat ring),
    per bucket cap, and whether it counts."""
    lines = [f"{label(row)} {row['speedup_vs_gloo']:.2f}x gloo at bucket_cap_mb "
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


def bar_lines(rows):
    """The issue's bars (reduction server >= 1.45x gloo samples/s; with fp16 compression
    >= 2.2x gloo fp32), per bucket cap, in words."""
    lines = []
    for row in rows:
        if row["algorithm"] != "reduction_server" or row.get("compress") not in (None, "fp16"):
            continue
        config = f"{row['hosts']} workers + {row['reducers']} reducer{'s' if row['reducers'] != 1 else ''}"
        counts, words = _ratio_standing(row, rows)
        bar = COMPRESSED_BAR if row.get("compress") else BAR
        met = row["speedup_vs_gloo"] >= bar and counts
        compressed = f" with {row['compress']} compression ({row['hook']})" if row.get("compress") else ""
        lines.append(f"bar ({config}): reduction server{compressed} {row['speedup_vs_gloo']:.2f}x gloo samples/s at "
                     f"bucket_cap_mb {row['bucket_cap_mb']:g}, need >= {bar}: "
                     + ("PASS" if met else "FAIL" + ("" if counts else f" (the ratio {words})")))
    return lines


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
    lines = [f"{where}; {first['tc']}",
             f"goodput B = {first['goodput_GBps'] * 8e3:.1f} Mbit/s per link and direction"
             + (f"; B_up = {uplink * 8e3:.1f} Mbit/s per rack uplink and direction" if uplink else ""),
             *plans,
             f"model: MLP, {first['layers']} x {first['width']}x{first['width']} + classifier ({CLASSES}), "
             f"{first['params'] / 1e6:.1f} M parameters = {first['grad_bytes'] / 1e6:.1f} MB of float32 gradients "
             f"(S); batch {first['batch']} per worker, SGD; {first['steps']} timed rounds after {first['warmup']} "
             "warm-up, the systems alternating step by step"]
    return lines


def _ms(value):
    return "-" if value is None else f"{value * 1e3:.0f}"


def _cells(row):
    """The table's cells of one row."""
    ratio, share, link = row["speedup_vs_gloo"], row["comm_share"], row["link_bytes"]
    ddp = ("-" if row["algorithm"] == "none" else
           f"{_ms(row['ddp_backward_compute_s'])}/{_ms(row['ddp_backward_comm_s'])}/{_ms(row['ddp_overlap_s'])}")
    same = {True: "yes", False: "NO", None: "-"}[row["params_identical"]]
    uplinks = ([_share(link.get("tx_per_uplink"), row), _share(link.get("rx_per_uplink"), row)]
               if row.get("racks") else [])
    return [label(row),
            f"{row['bucket_cap_mb']:g}", _ms(row["step_time_s"]), f"{row['samples_per_s']:.1f}",
            "-" if ratio is None else f"{ratio:.2f}x", "-" if share is None else f"{share:.0%}",
            f"{_ms(row['forward_s'])}/{_ms(row['backward_s'])}/{_ms(row['optimizer_s'])}", ddp,
            _ms(row["comm_floor_s"]), f"{link['tx_per_step'] / row['grad_bytes']:.3f}",
            f"{link['rx_per_step'] / row['grad_bytes']:.3f}", *uplinks,
            "-" if row["cpu_util"] is None else format(row["cpu_util"], ".0%"),
            "-" if row["bound_fraction"] is None else format(row["bound_fraction"], ".0%"), row["pace"] or "-", same]


def _share(value, row):
    return "-" if value is None else f"{value / row['grad_bytes']:.3f}"


COLUMNS = ("system", "bucket MB", "step ms", "samples/s", "vs gloo", "comm share", "fwd/bwd/opt ms",
           "DDP bwd compute/comm/overlap ms", "comm floor ms", "tx/S", "rx/S", "cpu", "floor/comm", "pace",
           "params identical")


def columns(rows):
    """COLUMNS, with each uplink's (mean) bytes per step over S after rx/S where there are racks."""
    if not rows[0].get("racks"):
        return COLUMNS
    at = COLUMNS.index("rx/S") + 1
    return COLUMNS[:at] + ("uplink tx/S", "uplink rx/S") + COLUMNS[at:]


def print_rows(rows):
    for line in heading(rows[0], rows):
        print("# " + line)
    names = columns(rows)
    table = [list(names)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(names))]
    for index, line in enumerate(table):
        text = "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        print(("# " if index == 0 else "  ") + text)
    for line in [_checks.PACE_LEGEND, *standing_lines(rows), *bar_lines(rows), *timeline_lines(rows)]:
        print("# " + line)


def reducer_lines(rows):
    """A line per reducer host of the run: its link's bytes over the whole job (every bucket
    size, warm-up included), its CPU use and how it ended."""
    info = next((r.get("reducer_hosts") for r in rows if r.get("reducer_hosts")), None) or {}
    lines = []
    for host, figures in sorted(info.items(), key=lambda item: int(item[0][1:])):
        totals = figures.get("totals") or {}
        lines.append(f"{host} (reducer {figures['index']}): {figures['link_bytes']['rx'] / 1e6:.0f} MB in, "
                     f"{figures['link_bytes']['tx'] / 1e6:.0f} MB out over its link during the job; "
                     f"{compare.reducer_cpu(totals)}; outcome {figures['outcome']}")
    return lines


def block_name(hosts, reducers, rate, per_host=1, racks=None, uplink_rate=None):
    """The RESULTS.md block a run writes: 'ddp 4+4 500mbit'; on layouts 'ddp 4x2 500mbit',
    'ddp 4x2+4 500mbit' (with 4 reducers), 'ddp 4x2 racks 2 uplink 250mbit 500mbit'."""
    if per_host > 1 or racks:
        return (f"ddp {hosts}x{per_host}" + (f"+{reducers}" if reducers else "")
                + (f" racks {racks} uplink {uplink_rate}" if racks else "") + f" {rate}")
    return f"ddp {hosts}+{reducers} {rate}"


def markdown(rows, command, name):
    """This run as a RESULTS.md block: the command, the date, the commit, the table, the bar."""
    names = columns(rows)
    lines = ["; ".join(heading(rows[0], rows)), "",
             "| " + " | ".join(names) + " |", "| --- " + "| ---: " * (len(names) - 1) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += ["", _checks.PACE_LEGEND + ".", ""] + [f"- {line}" for line in [*standing_lines(rows), *bar_lines(rows),
                                                                             *timeline_lines(rows)]]
    buckets = sorted({(r["bucket_cap_mb"], tuple(r["buckets_bytes"] or ())) for r in rows
                      if r["algorithm"] != "none"})
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


def run_job(bed, args):
    """The workers on the first N hosts, a reducer on each of the next R; (the workers'
    report, the reducers' figures, the link bytes of every host over the job)."""
    workers, reducers = args.hosts, args.reducers
    with tempfile.TemporaryDirectory(prefix="cc-train-") as work:
        os.chmod(work, 0o755)
        # The torch backend authenticates its connections also without reducers: a secret always.
        job = (compare.reducer_job_env(bed, work, reducers) if reducers
               else {"COLLECTIVES_TOKEN_FILE": str(compare.secret_file(work))})
        env = {**compare.base_env(), **bed.env(), **compare.PINNED_ENV, **job, "PYTHONUNBUFFERED": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        layout = layout_of(args)
        rank_hosts, rank_racks = layout.rank_hosts(bed.hosts[:workers]), layout.rank_racks()
        report_file, placement = Path(work) / "report.json", Path(work) / "placement"
        placement.mkdir()
        command = [sys.executable, str(HERE / "train.py"), "--worker-report", str(report_file),
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
        worker(args)
        return
    signal.signal(signal.SIGTERM, _interrupt)  # cleaned up as after Ctrl-C
    with testbed.Testbed(hosts=args.hosts + args.reducers, rate=args.rate, burst=args.burst,
                         tcp_cc=args.tcp_cc, per_host=args.per_host, racks=args.racks,
                         uplink_rate=args.uplink_rate) as bed:
        report, reducer_info = run_job(bed, args)
        rows = rows_from_report(report, setting_of(bed, args))
    for row in rows:
        if row["algorithm"] == "reduction_server":
            row["reducer_hosts"] = reducer_info
    _checks.check_traffic(link_problems(rows, reducer_info))
    print_rows(rows)
    for line in reducer_lines(rows):
        print("# " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"# wrote {len(rows)} rows to {args.json}")
    if args.results:
        name = block_name(args.hosts, args.reducers, args.rate, args.per_host, args.racks, args.uplink_rate)
        command = "python benchmarks/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        compare.update_results(args.results, markdown(rows, command, name), name, "train.py")
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
