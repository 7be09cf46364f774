"""Throughput, price and samples per dollar of a training job's options, and the advice: how many
reducers of which type (or none) maximise samples per dollar.

The advisor does not search every reducer count. Per reducer type and plan, samples per dollar
is k / ((c + a/R) * (P + p*R)) while the reducers are the bottleneck (step c + a/R seconds, a
the reducers' share of the all-reduce with one reducer, P the workers' $/h and p a reducer's),
which peaks at R = sqrt(a*P / (c*p)); past the sizing rule's count (total reducer bandwidth =
total worker bandwidth: R = W*B_worker/B_reducer) more reducers only cost. So it models the
counts around both and keeps the best (tests compare it with a brute-force search).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, List, Optional, Sequence

from .prices import Instance
from .simulator import PLANS, Calibration, Cluster, allreduce_time, step_time

__all__ = ["SUM_GBPS_PER_CORE", "SUM_SOURCE", "REDUCER_PLANS", "PLAIN_PLANS", "Job", "Setup", "Option", "Advice",
           "evaluate", "reducer_Bps", "sizing_rule", "advise", "brute_force"]

# Input bytes one core sums per second (a reducer adds each contribution into its sum): the avx2
# kernels' GB/s over 3 (they count two reads and a write per element).
SUM_GBPS_PER_CORE = {4: 30.29 / 3, 2: 22.67 / 3}  # by bytes per gradient element: float32, float16
SUM_SOURCE = "benchmarks/RESULTS.md, reduction kernels (issue 2): float32 30.29, float16 22.67 GB/s per core / 3"


@dataclasses.dataclass(frozen=True)
class Job:
    """The training job: what each step computes and sends."""
    params: float
    compute_s: float  # a step without communication
    batch_per_gpu: int
    bytes_per_param: int = 4  # the gradients' dtype
    compression: float = 1.0  # bytes on the wire per gradient byte (0.5: a bf16 compress hook)
    overlap: float = 0.0  # share of the compute that the all-reduce hides behind

    @property
    def wire_bytes(self) -> float:
        return self.params * self.bytes_per_param * self.compression


@dataclasses.dataclass(frozen=True)
class Setup:
    """The workers as bought, and the network between them."""
    worker: Instance
    workers: int
    gpus_per_worker: int
    nic_Bps: float  # a worker's goodput each way
    intra_Bps: float
    alpha_s: float
    pricing: str = "on-demand"
    hosts_per_rack: Optional[int] = None
    uplink_Bps: Optional[float] = None
    goodput_fraction: float = 1.0  # turns a NIC's Gbit/s into goodput
    rank_order: str = "block"  # which worker each rank sits on (simulator.RANK_ORDERS): the flat ring follows it

    def resized(self, workers: int) -> "Setup":
        return dataclasses.replace(self, workers=workers)

    def reducer_nic_Bps(self, reducer: Instance) -> float:
        """A reducer's NIC goodput each way."""
        return reducer.nic_gbps * 1e9 / 8 * self.goodput_fraction


@dataclasses.dataclass(frozen=True)
class Option:
    plan: str
    reducer: Optional[Instance]
    reducers: int
    allreduce_s: float
    step_s: float
    samples_per_s: float
    limit_samples_per_s: float  # with no communication at all
    usd_h: float
    bottleneck: str

    @property
    def samples_per_usd(self) -> float:
        return self.samples_per_s * 3600 / self.usd_h

    @property
    def of_limit(self) -> float:
        return self.samples_per_s / self.limit_samples_per_s

    @property
    def label(self) -> str:
        return self.plan if not self.reducers else f"{self.plan}, {self.reducers} x {self.reducer.type}"


def _cluster(job: Job, setup: Setup, reducer: Optional[Instance], reducers: int) -> Cluster:
    sum_Bps = math.inf
    if reducer is not None:
        cores = max(1, reducer.vcpus // 2)  # vCPUs are hyperthreads
        sum_Bps = cores * SUM_GBPS_PER_CORE.get(job.bytes_per_param, SUM_GBPS_PER_CORE[4]) * 1e9
    return Cluster(workers=setup.workers, ranks_per_host=setup.gpus_per_worker, nic_Bps=setup.nic_Bps,
                   intra_Bps=setup.intra_Bps, alpha_s=setup.alpha_s, hosts_per_rack=setup.hosts_per_rack,
                   uplink_Bps=setup.uplink_Bps, reducers=reducers,
                   reducer_nic_Bps=setup.reducer_nic_Bps(reducer) if reducer else 0.0, reducer_sum_Bps=sum_Bps,
                   rank_order=setup.rank_order)


def evaluate(job: Job, setup: Setup, calibration: Calibration, plan: str,
             reducer: Optional[Instance] = None, reducers: int = 0) -> Option:
    """One configuration's modelled step, throughput and price."""
    t = allreduce_time(plan, _cluster(job, setup, reducer, reducers), job.wire_bytes, calibration)
    step = step_time(job.compute_s, t.seconds, job.overlap)
    samples = setup.workers * setup.gpus_per_worker * job.batch_per_gpu
    usd_h = setup.workers * setup.worker.usd_h(setup.pricing) + (reducers * reducer.usd_h(setup.pricing) if reducers else 0)
    return Option(plan, reducer if reducers else None, reducers, t.seconds, step, samples / step,
                  samples / job.compute_s, usd_h, t.bottleneck)


def reducer_Bps(job: Job, setup: Setup, reducer: Instance) -> float:
    """What one reducer of this type takes in per second: its NIC's goodput or its summing rate."""
    c = _cluster(job, setup, reducer, 1)
    return min(c.reducer_nic_Bps, c.reducer_sum_Bps)


def sizing_rule(job: Job, setup: Setup, reducer: Instance) -> int:
    """Reducers of this type whose bandwidth together is at least the workers' together."""
    return max(1, math.ceil(setup.workers * setup.nic_Bps / reducer_Bps(job, setup, reducer) - 1e-9))


REDUCER_PLANS = tuple(p for p in PLANS if "reduction_server" in p)
PLAIN_PLANS = tuple(p for p in PLANS if p not in REDUCER_PLANS)


def _reducer_plans(setup: Setup) -> Sequence[str]:
    """With one rank per worker there is no host level: the hierarchy's reducers are the flat ones."""
    return REDUCER_PLANS if setup.gpus_per_worker > 1 else ("reduction_server",)


def _candidates(job: Job, setup: Setup, calibration: Calibration, plan: str, reducer: Instance,
                max_reducers: int) -> List[int]:
    """The reducer counts worth modelling: around the cost optimum while reducers pace the
    all-reduce, and around the sizing rule's count."""
    rule = sizing_rule(job, setup, reducer)
    senders = setup.workers * (1 if plan != "reduction_server" else setup.gpus_per_worker)
    a = senders * job.wire_bytes / reducer_Bps(job, setup, reducer) / calibration.rs_efficiency
    fixed = max(job.compute_s * (1 - job.overlap), 1e-9)
    P = setup.workers * setup.worker.usd_h(setup.pricing)
    p = max(reducer.usd_h(setup.pricing), 1e-9)
    optimum = math.sqrt(a * P / (fixed * p))
    # Where the reducers stop pacing the step: the bottleneck with enough reducers (the workers').
    enough = evaluate(job, setup, calibration, plan, reducer, max(rule, 1) * 64)
    knee = math.ceil(a / max(enough.allreduce_s, 1e-12))
    counts = {rule, rule + 1, knee, knee + 1, math.floor(optimum), math.ceil(optimum)}
    return sorted(r for r in counts if 1 <= r <= max_reducers)


@dataclasses.dataclass(frozen=True)
class Advice:
    best: Option  # the most samples per dollar, any plan
    best_without_reducers: Option
    considered: List[Option]

    @property
    def line(self) -> str:
        b = self.best
        gain = b.samples_per_usd / self.best_without_reducers.samples_per_usd
        if b.reducers:
            head = (f"{b.reducers} reducers of type {b.reducer.type} maximise samples per dollar "
                    f"({b.plan}: {b.samples_per_usd:,.0f} samples/$, {gain:.2f}x the best plan without reducers, "
                    f"{self.best_without_reducers.plan}) and reach {b.of_limit:.0%} of the samples/s limit")
        else:
            head = (f"No reducers: {b.plan} maximises samples per dollar ({b.samples_per_usd:,.0f} samples/$) "
                    f"and reaches {b.of_limit:.0%} of the samples/s limit")
        return head + "."


def advise(job: Job, setup: Setup, calibration: Calibration, reducer_types: Sequence[Instance],
           max_reducers: int = 4096) -> Advice:
    options = [evaluate(job, setup, calibration, plan) for plan in PLAIN_PLANS]
    for reducer in reducer_types:
        for plan in _reducer_plans(setup):
            options += [evaluate(job, setup, calibration, plan, reducer, r)
                        for r in _candidates(job, setup, calibration, plan, reducer, max_reducers)]
    return _advice(options)


def _advice(options: List[Option]) -> Advice:
    def best(of: Iterable[Option]) -> Option:
        # The most samples per dollar; of equals (a tie within 0.01%), the fewest reducers.
        of = list(of)
        top = max(o.samples_per_usd for o in of)
        return min((o for o in of if o.samples_per_usd >= top * 0.9999), key=lambda o: (o.reducers, PLANS.index(o.plan)))
    return Advice(best(options), best(o for o in options if not o.reducers), options)


def brute_force(job: Job, setup: Setup, calibration: Calibration, reducer_types: Sequence[Instance],
                max_reducers: int) -> Advice:
    """Every plan, reducer type and count up to `max_reducers`: what the advisor must come close to."""
    options = [evaluate(job, setup, calibration, plan) for plan in PLAIN_PLANS]
    options += [evaluate(job, setup, calibration, plan, reducer, r) for reducer in reducer_types
                for plan in _reducer_plans(setup) for r in range(1, max_reducers + 1)]
    return _advice(options)
