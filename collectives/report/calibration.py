"""The simulator's constants, fitted on measured testbed runs, and its error on runs it was not
fitted on.

Measurements come from the JSON that benchmarks/compare.py (all-reduce times) and
benchmarks/train.py (DDP step times) write. The fit is a least-squares one on relative error,
linear in its unknowns: the ring's rows give alpha (seconds per step) and the rings' efficiency;
with alpha known, the reduction server's rows give its latency in steps and its efficiency.
benchmarks/calibrate.py runs the fit on benchmarks/results/ and writes calibration.toml beside
this module, with the validation table that the report prints.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tomllib
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .simulator import Calibration, Cluster, allreduce_time, step_time

__all__ = ["Measurement", "Check", "TESTBED_INTRA_BPS", "measurements", "fit", "check", "median_error",
           "Stored", "load", "dumps"]

# A rank's bandwidth to the other ranks of its (emulated) host, over shared memory on the
# testbed machine: 1.518 GB/s algbw for 64 MiB over 4 ranks (benchmarks/RESULTS.md, issue 11),
# a bus bandwidth of 1.518 * 2(n-1)/n.
TESTBED_INTRA_BPS = 1.518e9 * 2 * 3 / 4

# The plans of compare.py/train.py rows (their `plan` key, else their `algorithm`) that the
# simulator models, by the simulator's name. The flat ring runs in the row's rank order
# ("ring:rank-order": in an interleaved order it crosses a rack uplink at every hop), except
# "ring:rack-ordered", a ring over a group ordered rack by rack: a block order whatever the
# ranks' order.
_MEASURED_PLANS = {"ring": "ring", "ring:rank-order": "ring", "ring:rack-ordered": "ring", "hierarchical": "hierarchical",
                   "reduction_server": "reduction_server",
                   "reduction_server:host": "hierarchical+reduction_server"}
_REDUCER_PLANS = ("reduction_server", "hierarchical+reduction_server")
# Bytes on the wire per gradient byte of a train.py row by its `compress`: torch's fp16/bf16
# compress hooks send 2 bytes per 4-byte float32 gradient (the counters: 0.503 x S per host).
_WIRE_PER_GRADIENT_BYTE = {None: 1.0, "fp16": 0.5, "bf16": 0.5}


def _plan(row: Dict) -> Optional[str]:
    """The simulator's plan for a row, or None where it models none."""
    plan = row.get("plan") or row.get("algorithm")
    if plan.startswith("hierarchical:"):  # the planner's levels, e.g. "hierarchical:host+rack"
        plan = "hierarchical"
    return _MEASURED_PLANS.get(plan)


def _rank_order(row: Dict) -> str:
    """The order the modelled ring takes: the row's rank order, but rack by rack for ring:rack-ordered."""
    if (row.get("plan") or row.get("algorithm")) == "ring:rack-ordered":
        return "block"
    return row.get("rank_order") or "block"


@dataclasses.dataclass(frozen=True)
class Measurement:
    source: str  # "file.json#index"
    what: str  # "all-reduce" or "DDP step"
    plan: str
    cluster: Cluster  # alpha_s 0: the calibration's alpha is put in when modelling
    bytes: float
    seconds: float  # measured: the all-reduce's median time or the step's
    compute_s: float = 0.0  # a step's compute without communication (DDP steps)
    note: str = ""
    rank_order: str = "block"  # the run's (the modelled ring's is the cluster's: ring:rack-ordered orders its group)
    compress: Optional[str] = None  # train.py --compress: `bytes` is what went on the wire

    @property
    def config(self) -> Tuple:
        """What makes two measurements the same configuration."""
        c = self.cluster
        return (self.what, self.plan, c.workers, c.ranks_per_host, c.hosts_per_rack, c.reducers,
                round(c.nic_Bps, -5), self.bytes, self.rank_order, c.rank_order)

    def describe(self) -> str:
        c = self.cluster
        shape = f"{c.workers} hosts" + (f" x {c.ranks_per_host} ranks" if c.ranks_per_host > 1 else "")
        if c.hosts_per_rack:
            shape += f" in {c.racks} racks ({c.uplink_Bps * 8 / 1e6:.0f} Mbit/s uplinks)"
        if c.reducers:
            shape += f" + {c.reducers} reducers"
        if self.rank_order != "block":
            shape += f", {self.rank_order} rank order"
            if c.rank_order != self.rank_order:
                shape += " (ring:rack-ordered: its group takes the ranks in rack order)"
        wire = f" ({self.compress} on the wire)" if self.compress else ""
        return f"{self.what} {self.plan}, {shape}, {c.nic_Bps * 8 / 1e6:.0f} Mbit/s, {self.bytes / 2**20:.1f} MiB{wire}"

    def model(self, calibration: Calibration) -> float:
        cluster = dataclasses.replace(self.cluster, alpha_s=calibration.alpha_s)
        t = allreduce_time(self.plan, cluster, self.bytes, calibration).seconds
        return step_time(self.compute_s, t) if self.what == "DDP step" else t


def _cluster(row: Dict, reducers: int) -> Cluster:
    racks = row.get("racks")
    uplink = row.get("uplink_goodput_GBps")
    return Cluster(workers=row["hosts"], ranks_per_host=row.get("per_host") or 1,
                   nic_Bps=row["goodput_GBps"] * 1e9, intra_Bps=TESTBED_INTRA_BPS, alpha_s=0.0,
                   hosts_per_rack=max(racks) if racks and len(racks) > 1 else None,
                   uplink_Bps=uplink * 1e9 if racks and len(racks) > 1 else None,
                   reducers=reducers, reducer_nic_Bps=row["goodput_GBps"] * 1e9, rank_order=_rank_order(row))


def measurements(path: str) -> List[Measurement]:
    """The library's rows of a compare.py or train.py JSON file (peers' rows are left out)."""
    rows = json.loads(Path(path).read_text())
    if isinstance(rows, dict):
        rows = [rows]
    found = []
    for i, row in enumerate(rows):
        plan = _plan(row) if row.get("system") == "collectives" else None
        if plan is None:
            continue
        reducers = (row.get("reducers") or 0) if plan in _REDUCER_PLANS else 0
        source = f"{Path(path).name}#{i}"
        order = row.get("rank_order") or "block"
        # compare.py's pace says whether the links set it despite a busy CPU; older rows have cpu_bound only.
        note = "CPU-bound" if row.get("pace", "cpu" if row.get("cpu_bound") else "links") == "cpu" else ""
        if "step_time_s" in row:  # train.py: the compute is the step of the "none" row of its bucket size
            none = [r for r in rows if r.get("system") == "none" and r.get("bucket_cap_mb") == row.get("bucket_cap_mb")]
            compress = row.get("compress")
            if not none or compress not in _WIRE_PER_GRADIENT_BYTE:
                continue
            found.append(Measurement(source, "DDP step", plan, _cluster(row, reducers),
                                     row["grad_bytes"] * _WIRE_PER_GRADIENT_BYTE[compress], row["step_time_s"],
                                     none[0]["step_time_s"], note, order, compress))
        elif "time_s" in row:
            found.append(Measurement(source, "all-reduce", plan, _cluster(row, reducers), row["bytes"],
                                     row["time_s"], 0.0, note, order))
    return found


def fit(ring_rows: Sequence[Measurement], rs_rows: Sequence[Measurement], goodput_fraction: float) -> Calibration:
    """Least squares on relative error: ring rows give alpha and the rings' efficiency; then the
    reduction server's rows give its latency (in steps of alpha) and its efficiency.
    `goodput_fraction` (the testbed links' TCP goodput over their rate) is carried along."""
    unit = Calibration(alpha_s=0.0, rs_steps=0.0, ring_efficiency=1.0, rs_efficiency=1.0, goodput_fraction=1.0)

    def parts(m: Measurement):
        return allreduce_time(m.plan, m.cluster, m.bytes, unit)  # the cluster's alpha is 0

    a, b = [], []
    for m in ring_rows:
        r = parts(m)
        a.append([r.steps / m.seconds, r.link_s / m.seconds])
        b.append(1.0)
    (alpha, inverse_efficiency), *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
    a, b = [], []
    for m in rs_rows:
        r = parts(m)
        a.append([alpha / m.seconds, r.link_s / m.seconds])
        b.append(1.0 - (r.fill_s + r.steps * alpha) / m.seconds)
    (rs_steps, rs_inverse), *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
    return Calibration(alpha_s=float(alpha), rs_steps=float(rs_steps), ring_efficiency=float(1 / inverse_efficiency),
                       rs_efficiency=float(1 / rs_inverse), goodput_fraction=goodput_fraction)


@dataclasses.dataclass(frozen=True)
class Check:
    """One held-out measurement against the model."""
    source: str
    description: str
    measured_s: float
    modelled_s: float
    note: str = ""

    @property
    def error(self) -> float:
        return (self.modelled_s - self.measured_s) / self.measured_s


def check(calibration: Calibration, rows: Iterable[Measurement]) -> List[Check]:
    return [Check(m.source, m.describe(), m.seconds, m.model(calibration), m.note) for m in rows]


def median_error(checks: Sequence[Check]) -> float:
    return statistics.median(abs(c.error) for c in checks)


@dataclasses.dataclass(frozen=True)
class Stored:
    """calibration.toml: the constants, what they were fitted on, and the held-out checks."""
    calibration: Calibration
    fitted_on: List[str]  # "file.json#i: description"
    checks: List[Check]
    command: str  # how to regenerate it
    date: str


def dumps(stored: Stored) -> str:
    """calibration.toml's text (a small fixed form: tomllib reads it back)."""
    def q(text: str) -> str:
        return json.dumps(text)  # a TOML basic string is a JSON string for these characters
    c = stored.calibration
    lines = [
        "# Written by benchmarks/calibrate.py: do not edit; regenerate with the command below.",
        f"command = {q(stored.command)}",
        f"date = {q(stored.date)}",
        f"fitted_on = [{', '.join(q(f) for f in stored.fitted_on)}]",
        "",
        "[calibration]",
        f"alpha_s = {c.alpha_s!r}",
        f"rs_steps = {c.rs_steps!r}",
        f"ring_efficiency = {c.ring_efficiency!r}",
        f"rs_efficiency = {c.rs_efficiency!r}",
        f"goodput_fraction = {c.goodput_fraction!r}",
    ]
    for k in stored.checks:
        lines += ["", "[[check]]", f"source = {q(k.source)}", f"description = {q(k.description)}",
                  f"measured_s = {k.measured_s!r}", f"modelled_s = {k.modelled_s!r}", f"note = {q(k.note)}"]
    return "\n".join(lines) + "\n"


def load(path: Optional[str] = None) -> Stored:
    """The shipped calibration (or the one at `path`)."""
    text = Path(path).read_text() if path else (resources.files(__package__) / "calibration.toml").read_text()
    data = tomllib.loads(text)
    return Stored(Calibration(**data["calibration"]), data["fitted_on"],
                  [Check(**k) for k in data.get("check", [])], data["command"], data["date"])
