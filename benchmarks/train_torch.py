"""train.py's worker for PyTorch: DistributedDataParallel over gloo, the collectives ring and
the collectives reduction server (and, on layouts, the hierarchical plan), one process group
each, the systems taking turns step by step (see train.py's docstring)."""

import datetime
import hashlib
import os
import time

import _checks
from _train_worker import CLASSES, COLLECTIVES_SYSTEMS, LEARNING_RATE, timed_rounds, write_report

# --compress: torch's own DDP communication hooks, which cast each bucket to the half type,
# all-reduce it (the reducers sum it in float32 and round once) and cast it back.
HOOKS = {"fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook"}
# DDP's runtime logging (nanoseconds), sampled every step: the backward pass's compute, its
# all-reduces (first bucket's start to last bucket's end) and how much of them overlapped.
DDP_TIMES = {"ddp_backward_compute_s": "backward_compute_time", "ddp_backward_comm_s": "backward_comm_time",
             "ddp_overlap_s": "backward_compute_comm_overlap_time"}


def system_parts(name):
    """A system's key split: "reduction_server+fp16" -> ("reduction_server", "fp16"); "gloo" -> ("gloo", None)."""
    base, _, compress = name.partition("+")
    return base, compress or None


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

    def ddp_times(name):
        logged = runners[name]._get_ddp_logging_data()
        return {key: logged.get(field, 0) / 1e9 for key, field in DDP_TIMES.items()}

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
        record, cpu = timed_rounds(args, systems, lambda name: train_step(runners[name], optimizers[name]),
                                   dist.barrier, rank, f"bucket_cap_mb {cap:g}", extra=ddp_times, switch=switch)
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
        write_report(args, size, systems, algorithms, phases)
    dist.destroy_process_group()
