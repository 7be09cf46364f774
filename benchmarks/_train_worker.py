"""What train.py's workers share, whatever the framework (train_torch.py, train_tf.py): the
workload's constants, the timed rounds in which the systems take turns step by step, and the
report worker 0 writes for the driver."""

import json
from pathlib import Path

import _common
import testbed

LEARNING_RATE = 0.01
CLASSES = 16
COLLECTIVES_SYSTEMS = ("ring", "hierarchical", "reduction_server")  # the systems collectives runs


def parameter_count(width, layers, classes=CLASSES):
    """The MLP's parameters: `layers` square layers with biases, then the classifier."""
    return layers * (width * width + width) + width * classes + classes


def timed_rounds(args, systems, step, barrier, rank, what, extra=None, switch=""):
    """--warmup then --steps rounds of one step(name) per system, the order rotating from round
    to round, every step between two barrier()s; ({system: {figure: [per timed round]}},
    {system: [[machine CPU use, step seconds] per timed round]}); with --timeline, each step's
    link timeline too (wire_out_s, wire_out_end_s, wire_in_s: _common.LinkTimeline). step(name) returns its
    figures (step_s and any others); extra(name), if given, more figures of a communicating
    system's step (read after it). switch: with racks, the switch namespace's pid whose uplink
    counters worker 0 reads around each step. Rank 0 prints each round's step times after
    `what` ("bucket_cap_mb 25")."""
    record = {name: {} for name in systems}
    cpu = {name: [] for name in systems}
    for round_ in range(args.warmup + args.steps):
        turn, last = round_ % len(systems), {}
        for name in systems[turn:] + systems[:turn]:
            # The link counters are read before the barrier (once a worker leaves it, its
            # bytes may reach a host whose worker has not) and after another (every worker's
            # step is done, so every byte of it has crossed), as allreduce.py does.
            link = _common.link_counters(args.link)
            uplinks = testbed.uplink_counters(switch) if switch else None
            barrier()
            sampler = testbed.CpuSampler().start()
            timeline = _common.LinkTimeline(args.link).start() if args.timeline else None
            figures = step(name)
            sampler.stop()
            if timeline:
                timeline.stop()
                figures["wire_out_s"], figures["wire_out_end_s"], figures["wire_in_s"] = \
                    timeline.out_s, timeline.out_end_s, timeline.in_s
            barrier()
            link_after = _common.link_counters(args.link)
            uplinks_after = testbed.uplink_counters(switch) if switch else None
            last[name] = figures["step_s"]
            if round_ < args.warmup:
                continue
            figures["tx"], figures["rx"] = link_after[0] - link[0], link_after[1] - link[1]
            if uplinks is not None:
                figures["uplinks"] = {rack: [out - uplinks[rack][0], into - uplinks[rack][1]]
                                      for rack, (out, into) in uplinks_after.items()}
            if name != "none" and extra is not None:
                figures.update(extra(name))
            for key, value in figures.items():
                record[name].setdefault(key, []).append(value)
            cpu[name].append([sampler.util, figures["step_s"]])
        if rank == 0:
            print(f"# {what}, {'warm-up ' if round_ < args.warmup else ''}round "
                  f"{round_ + 1 - (0 if round_ < args.warmup else args.warmup)}, rank 0's steps: "
                  + ", ".join(f"{name} {last[name]:.3f} s" for name in systems), flush=True)
    return record, cpu


def write_report(args, world, systems, algorithms, phases, **more):
    """Worker 0's report of the job (every rank's figures, per phase) to --worker-report."""
    report = {"world": world, "systems": systems, "algorithms": algorithms,
              "params": parameter_count(args.width, args.layers), "width": args.width, "layers": args.layers,
              "classes": CLASSES, "batch": args.batch, "lr": LEARNING_RATE, "warmup": args.warmup,
              "steps": args.steps, "phases": phases, **more}
    Path(args.worker_report).write_text(json.dumps(report) + "\n")
