"""collectives-report: throughput per dollar of ring, hierarchical and reduction-server training
for a model on a cloud cluster, with the advice how many reducers of which type to buy.

    collectives-report --model-params 340M --step-compute-ms 180 --workers 8 \\
        --gpu-type a2-highgpu-8g --nic-gbps 100 --out DIR
    collectives-report --json benchmarks/results/ddp_4+4_500mbit.json --out DIR   # the model of a train.py run

writes DIR/report.html (self-contained) and DIR/report.md (with its plots beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import advisor, calibration, prices, render
from .simulator import PLANS, RANK_ORDERS

__all__ = ["main"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """ "340M" -> 340e6, "1.5B" -> 1.5e9, "25210896" -> 25210896."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMBGT]?)\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count like 340M, 1.5B or 25210896")
    return float(match.group(1)) * _SUFFIX[match.group(2).upper()]


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collectives-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model-params", type=parse_count, help="the model's parameters (340M, 1.5B); or from a train.py --json")
    add("--step-compute-ms", type=_positive(float), help="a training step's time without communication")
    add("--batch", type=_positive(int), default=None, help="samples per GPU per step (default 32, or the train.py JSON's)")
    add("--grad-dtype", choices=sorted(_DTYPE_BYTES), default="float32", help="the gradients' dtype")
    add("--compression", type=_positive(float), default=1.0,
        help="bytes on the wire per gradient byte (0.5: a bf16 compress hook over float32 gradients)")
    add("--overlap", type=float, default=0.0, help="share of the step's compute that the all-reduce hides behind (0..1)")
    add("--workers", type=_positive(int), default=8, help="GPU worker VMs")
    add("--gpu-type", default="a2-highgpu-8g", help="the workers' instance type (a price book row)")
    add("--gpus-per-worker", type=_positive(int), help="ranks per worker VM (default: the type's GPUs)")
    add("--nic-gbps", type=_positive(float), help="a worker's NIC, Gbit/s (default: the type's)")
    add("--intra-gbytes", type=_positive(float), help="a GPU's bandwidth to its VM's other GPUs, GB/s (default: the type's)")
    add("--latency-us", type=_positive(float), help="seconds per message, in us (default: the core's cost model)")
    add("--hosts-per-rack", type=_positive(int), help="workers per rack, with --uplink-gbps (default: one flat network)")
    add("--uplink-gbps", type=_positive(float), help="a rack's uplink, Gbit/s")
    add("--rank-order", choices=RANK_ORDERS, default="block",
        help="which worker each rank sits on, which the flat ring follows: block (each worker's GPUs consecutive, "
        "the workers rack by rack) or interleaved (rank i on the (i mod W)-th worker, the workers taken round-robin "
        "over the racks, as a scheduler may deal them out: every ring hop then crosses a NIC and an uplink)")
    add("--reducer-types", help="comma-separated CPU types for reducers (default: every CPU type of the workers' cloud)")
    add("--max-reducers", type=_positive(int), default=4096, help="the most reducers to consider")
    add("--reducers", type=_positive(int), help="also model exactly this many reducers of each reducer type "
        "(a configuration you have in mind; the advice is searched for all the same)")
    add("--max-workers", type=_positive(int), default=1024, help="the largest cluster of the cluster-size sweep")
    add("--pricing", choices=("on-demand", "spot"), default="on-demand")
    add("--prices", action="append", default=[], metavar="FILE", help="a TOML price book adding or replacing rows")
    add("--calibration", metavar="FILE", help="a calibration.toml from benchmarks/calibrate.py (default: the shipped one)")
    add("--json", action="append", default=[], metavar="FILE",
        help="compare.py/train.py JSON: its runs are checked against the model; a train.py run gives the model")
    add("--out", default="collectives-report", metavar="DIR", help="where report.html and report.md go")
    return p


def _from_train_json(paths: Sequence[str]) -> Optional[dict]:
    """The model of the first train.py run given: its "no communication" row."""
    for path in paths:
        rows = json.loads(Path(path).read_text())
        for row in rows if isinstance(rows, list) else [rows]:
            if row.get("system") == "none" and "params" in row:
                return {"params": row["params"], "compute_s": row["step_time_s"], "batch": row["batch"],
                        "source": f"measurement: {Path(path).name} (train.py, 'no communication' row, "
                                  f"bucket_cap_mb {row.get('bucket_cap_mb')})"}
    return None


def build(args: argparse.Namespace) -> render.Report:
    book = prices.load(args.prices)
    stored = calibration.load(args.calibration)
    cal = stored.calibration
    cal_source = f"measurement: {args.calibration or 'collectives/report/calibration.toml'} ({stored.command}, {stored.date})"
    worker = book[args.gpu_type]
    if worker.gpus < 1:
        raise ValueError(f"--gpu-type {worker.type} has no GPUs: name a GPU type ({', '.join(t for t, r in book.rows.items() if r.gpus)})")
    trained = _from_train_json(args.json)
    inputs: List[Tuple[str, str, str]] = []
    explicit = getattr(args, "explicit", set())

    def flag(name: str) -> str:
        return f"flag --{name}" + ("" if name.replace("-", "_") in explicit else " (default)")

    def given(flag: str, value, default_source: str) -> str:
        return f"flag --{flag}" if value is not None else default_source

    if args.model_params is not None:
        params, params_source = args.model_params, "flag --model-params"
    elif trained:
        params, params_source = trained["params"], trained["source"]
    else:
        raise ValueError("give the model: --model-params and --step-compute-ms, or --json with a train.py run")
    if args.step_compute_ms is not None:
        compute_s, compute_source = args.step_compute_ms / 1e3, "flag --step-compute-ms"
    elif trained:
        compute_s, compute_source = trained["compute_s"], trained["source"]
    else:
        raise ValueError("give the step's compute time: --step-compute-ms (or --json with a train.py run)")
    batch = args.batch or (trained["batch"] if trained else 32)
    batch_source = given("batch", args.batch, trained["source"] if trained else "flag --batch (default 32)")
    gpus = args.gpus_per_worker or worker.gpus
    nic_gbps = args.nic_gbps or worker.nic_gbps
    intra = args.intra_gbytes or worker.intra_GBps or 16.0
    if args.latency_us is not None:
        alpha, alpha_source = args.latency_us * 1e-6, "flag --latency-us"
    else:
        from .. import ring  # the core's cost model (select.h)
        alpha, alpha_source = ring.DEFAULT_COST[0], "the core's cost model (csrc/algorithms/select.h: same-rack TCP)"
    if (args.hosts_per_rack is None) != (args.uplink_gbps is None):
        raise ValueError("--hosts-per-rack and --uplink-gbps go together")
    if not 0 <= args.overlap <= 1:
        raise ValueError(f"--overlap must be within [0, 1], not {args.overlap}")
    if args.reducer_types:
        reducer_types = [book[t.strip()] for t in args.reducer_types.split(",") if t.strip()]
        if any(r.gpus for r in reducer_types):
            raise ValueError("--reducer-types: reducers are CPU-only types")
    else:
        reducer_types = book.reducer_types(worker.cloud)

    job = advisor.Job(params=params, compute_s=compute_s, batch_per_gpu=batch,
                      bytes_per_param=_DTYPE_BYTES[args.grad_dtype], compression=args.compression, overlap=args.overlap)
    goodput = cal.goodput_fraction
    setup = advisor.Setup(worker=worker, workers=args.workers, gpus_per_worker=gpus, nic_Bps=nic_gbps * 1e9 / 8 * goodput,
                          intra_Bps=intra * 1e9, alpha_s=alpha, pricing=args.pricing, hosts_per_rack=args.hosts_per_rack,
                          uplink_Bps=args.uplink_gbps * 1e9 / 8 * goodput if args.uplink_gbps else None,
                          goodput_fraction=goodput, rank_order=args.rank_order)

    inputs += [
        ("model parameters", f"{params:,.0f}", params_source),
        ("gradients", f"{args.grad_dtype}, {job.bytes_per_param} bytes per parameter", flag("grad-dtype")),
        ("bytes on the wire per gradient byte", f"{args.compression:g}", flag("compression")),
        ("bytes on the wire per all-reduce", f"{job.wire_bytes / 1e6:,.1f} MB", "parameters x bytes per parameter x compression"),
        ("step compute (no communication)", f"{compute_s * 1e3:,.1f} ms", compute_source),
        ("overlap of compute and all-reduce", f"{args.overlap:g}", flag("overlap")),
        ("batch per GPU", str(batch), batch_source),
        ("workers", str(args.workers), flag("workers")),
        ("worker type", worker.type, flag("gpu-type")),
        ("GPUs (ranks) per worker", str(gpus), given("gpus-per-worker", args.gpus_per_worker, worker.cited)),
        ("worker NIC", f"{nic_gbps:g} Gbit/s", given("nic-gbps", args.nic_gbps, worker.cited)),
        ("TCP goodput of a NIC's rate", f"{goodput:.3f}", cal_source),
        ("GPU to GPU inside a worker", f"{intra:g} GB/s", given("intra-gbytes", args.intra_gbytes, worker.cited if worker.intra_GBps else "default (PCIe 4.0 x16)")),
        ("latency per message (alpha)", f"{alpha * 1e6:g} us", alpha_source),
        ("pricing", args.pricing, flag("pricing")),
        (f"worker price ({args.pricing})", f"${worker.usd_h(args.pricing):g}/h", worker.cited),
        ("network", f"racks of {args.hosts_per_rack} workers, {args.uplink_gbps:g} Gbit/s uplinks" if args.hosts_per_rack
         else "one flat network (no oversubscription)", "flags --hosts-per-rack, --uplink-gbps" if args.hosts_per_rack else "default"),
        ("rank order (the flat ring's)", args.rank_order, flag("rank-order")),
        ("reducer summing rate", f"{advisor.SUM_GBPS_PER_CORE[4 if job.bytes_per_param == 4 else 2]:.2f} GB/s of input per core "
         "(vCPUs / 2 cores)", f"measurement: {advisor.SUM_SOURCE}"),
        ("simulator constants", f"alpha on the testbed {cal.alpha_s * 1e3:.3f} ms/step, reducers' latency {cal.rs_steps:.2f} steps, "
         f"efficiency rings {cal.ring_efficiency:.3f}, reduction server {cal.rs_efficiency:.3f}", cal_source),
    ]
    inputs += [(f"reducer price: {r.type} ({args.pricing})", f"${r.usd_h(args.pricing):g}/h", r.cited) for r in reducer_types]

    advice = advisor.advise(job, setup, cal, reducer_types, args.max_reducers)
    options = _best_per_plan(advice, reducer_types)
    sizing = []
    for r in reducer_types:
        of_type = [o for o in options if o.reducer is r]  # best first
        sizing.append((r, advisor.reducer_Bps(job, setup, r) * 8 / 1e9, advisor.sizing_rule(job, setup, r),
                       of_type[0].reducers if of_type else None))

    # Reducer counts: the advised type (or the best reducer option's), 1 .. twice the larger of the rule and the advice.
    with_reducers = [o for o in options if o.reducers]
    reducer = advice.best.reducer or (with_reducers[0].reducer if with_reducers else None)
    top = max(2 * advisor.sizing_rule(job, setup, reducer), 2 * advice.best.reducers, 16) if reducer else 16
    counts = sorted({max(1, round(top * k / 200)) for k in range(1, 201)})
    series = {}
    for plan in PLANS:
        if plan in advisor.REDUCER_PLANS:
            if reducer and any(o.plan == plan for o in options):
                series[plan] = [advisor.evaluate(job, setup, cal, plan, reducer, r) for r in counts]
        else:
            series[plan] = [advisor.evaluate(job, setup, cal, plan)] * len(counts)
    by_reducers = render.Sweep(f"reducers ({reducer.type if reducer else 'none in the price book'}), "
                               f"{args.workers} workers", counts, series)

    sizes = sorted({2 ** k for k in range(0, int(math.log2(args.max_workers)) + 1)} | {args.workers})
    per_size = [_best_per_plan(advisor.advise(job, setup.resized(w), cal, reducer_types, args.max_reducers), reducer_types,
                               per_type=False) for w in sizes]
    by_workers = render.Sweep(f"workers ({worker.type})", sizes,
                              {plan: [next(o for o in opts if o.plan == plan) for opts in per_size] for plan in PLANS
                               if all(any(o.plan == plan for o in opts) for opts in per_size)})

    given = [advisor.evaluate(job, setup, cal, plan, r, args.reducers) for r in reducer_types
             for plan in advisor.REDUCER_PLANS if any(o.plan == plan for o in options)] if args.reducers else []
    measured = [k for path in args.json for k in calibration.check(cal, calibration.measurements(path))]
    used = [worker] + list(reducer_types)
    title = (f"collectives-report: {params / 1e6:,.0f}M parameters on {args.workers} x {worker.type} "
             f"({gpus} GPUs each, {args.pricing})")
    return render.Report(title, advice, inputs, used, options, given, sizing, nic_gbps * goodput, args.workers,
                         by_reducers, by_workers, stored, measured)


def _best_per_plan(advice: advisor.Advice, reducer_types, per_type: bool = True) -> List[advisor.Option]:
    """Of the options considered, the best per plan (and per reducer type), best first."""
    best = {}
    for o in advice.considered:
        key = (o.plan, o.reducer.type if o.reducer and per_type else None)
        if key not in best or o.samples_per_usd > best[key].samples_per_usd:
            best[key] = o
    # Best first; of equals within 0.01% of the best (as the advice takes ties), the fewest reducers.
    top = max(o.samples_per_usd for o in best.values())
    return sorted(best.values(), key=lambda o: (-(top if o.samples_per_usd >= top * 0.9999 else o.samples_per_usd),
                                                o.reducers))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # Which flags were given (the inputs table says "(default)" of the others).
    args.explicit = {a.dest for a in parser._actions for word in argv for o in a.option_strings
                     if word == o or word.startswith(o + "=")}
    try:
        report = build(args)
    except (ValueError, KeyError, OSError) as e:
        parser.error(str(e).strip('"'))
    md, page = render.write(report, args.out)
    print(report.advice.line)
    print(f"wrote {page} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
