"""All-reduce and training-step times for the library's plans on a cluster, by an alpha-beta model.

An all-reduce of S bytes (on the wire) costs

    t = alpha * steps  +  fill  +  max over links (bytes the plan moves over it / its bandwidth) / efficiency

* alpha: seconds per message on the plan's critical path; steps: the plan's messages in a row
  (a ring 2(n-1), each level of a hierarchy 2(m-1), a reduction-server all-reduce `rs_steps`,
  calibrated). The core's cost model (csrc/algorithms/select.cc) counts steps the same way.
* the bandwidth term is the pipelined one: the library cuts buffers into segments (ring) or
  chunks (reducers) and runs a hierarchy's levels over pieces at once, so every link of a plan
  is busy together and the slowest one paces it (select.cc adds the levels one after the other,
  which is what they cost unpipelined). Links: a rank's link to the other ranks of its host
  (shared memory, NVLink), each worker host's NIC, each rack's uplink, each reducer's NIC, and
  each reducer's summing rate. Bytes per link, each way:
    - ring over n ranks: every hop carries 2(n-1)/n * S, and crosses the links between its two
      ranks: the hops that leave a host go through its NIC, those that leave a rack through its
      uplink, so the host (rack) with the most hops out of it paces the ring. In block rank order
      (each host's ranks consecutive, each rack's hosts consecutive) that is one hop out of each
      host and each rack. In interleaved order (`rank_order`, as a scheduler may deal ranks out:
      rank i on the (i mod W)-th host, the hosts taken round-robin over the racks) consecutive
      ranks sit on different hosts of alternating racks, so every hop crosses a NIC and, with
      racks, an uplink: 2 racks of 4 hosts send 4 hops out of each rack, 4x a block ring's
      uplink bytes (benchmarks/compare.py --rank-order interleaved counted 4.06x those of the
      ring over the same ranks in rack order);
    - hierarchical (the planner's levels, collectives/hierarchical/planner.py): a level of groups
      of m moves 2(m-1)/m * S out of each of its children (a rank, a host, a rack), spread over
      the links one level down (a rack's hosts share its traffic);
    - reduction server, flat (COLLECTIVES_RS_PLAN=flat, or one rank per host): each rank sends S
      to the reducers and gets S back, so a host of G ranks moves G * S through its NIC; each of
      R reducers moves n*S/R and sums n*S/R;
    - hierarchical + reduction server (the library's host plan, "reduction_server:host",
      collectives/reduction_server/host_plan.py): the ranks of a host reduce-scatter over shared
      memory, local rank j exchanges its 1/G of the buffer with the reducers, and the host
      all-gathers the sums, pipelined over pieces; so each host's NIC moves S each way, each
      rank's shared-memory link 2(G-1)/G * S, and each reducer n_hosts*S/R.
* fill: a reduction-server chunk's trip up and its sum's trip down before the pipeline is full.
* efficiency: the fraction of the links' goodput a plan reaches, calibrated on the testbed
  (calibration.py), per algorithm family.

A training step: compute * (1 - overlap) + max(compute * overlap, all-reduce), overlap being
the share of the step's compute that the all-reduce can hide behind (0: none).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple

from ..hierarchical import planner

__all__ = ["PLANS", "RANK_ORDERS", "Calibration", "Cluster", "Result", "allreduce_time", "link_bytes",
           "rank_hosts", "rs_chunk_bytes", "step_time"]

PLANS = ("ring", "hierarchical", "reduction_server", "hierarchical+reduction_server")
# Which host each rank sits on (the flat ring follows rank order; the other plans group ranks by
# host and rack, whatever their order): see rank_hosts().
RANK_ORDERS = ("block", "interleaved")

# The reduction server's chunking (README, COLLECTIVES_RS_CHUNK_BYTES): a reducer's share cut into
# 256 chunks, clamped to 32 KiB..4 MiB.
_RS_CHUNKS_PER_SHARE = 256
_RS_CHUNK_MIN, _RS_CHUNK_MAX = 32 << 10, 4 << 20


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The model's fitted constants (calibration.py fits them on testbed runs)."""
    alpha_s: float  # seconds per ring step on the testbed
    rs_steps: float  # a reduction-server all-reduce's latency, in ring steps
    ring_efficiency: float  # fraction of the links' goodput reached by rings (also a hierarchy's levels)
    rs_efficiency: float  # ... by the reduction server
    goodput_fraction: float  # TCP goodput / link rate on the testbed (framing, headers)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Worker hosts, each with `ranks_per_host` ranks (GPUs); optional racks and reducers.
    Bandwidths are in bytes/s each way, as goodput (what TCP gets through)."""
    workers: int
    ranks_per_host: int
    nic_Bps: float
    intra_Bps: float  # one rank's link to its host's other ranks
    alpha_s: float
    hosts_per_rack: Optional[int] = None
    uplink_Bps: Optional[float] = None
    reducers: int = 0
    reducer_nic_Bps: float = 0.0
    reducer_sum_Bps: float = math.inf  # bytes of contributions one reducer sums per second
    rank_order: str = "block"  # RANK_ORDERS

    def __post_init__(self):
        if self.rank_order not in RANK_ORDERS:
            raise ValueError(f"rank order {self.rank_order!r}: choose from {', '.join(RANK_ORDERS)}")
        if self.workers < 1 or self.ranks_per_host < 1:
            raise ValueError("a cluster needs at least one worker host with at least one rank")
        if self.reducers and self.reducer_nic_Bps <= 0:
            raise ValueError("reducers need a positive NIC bandwidth")
        if (self.hosts_per_rack is None) != (self.uplink_Bps is None):
            raise ValueError("racks need both hosts_per_rack and uplink_Bps")

    @property
    def ranks(self) -> int:
        return self.workers * self.ranks_per_host

    @property
    def racks(self) -> int:
        return 1 if self.hosts_per_rack is None else math.ceil(self.workers / self.hosts_per_rack)


@dataclasses.dataclass(frozen=True)
class Result:
    plan: str
    seconds: float  # the whole modelled time
    bottleneck: str  # the link that paces the plan
    link_s: float  # the bottleneck's bytes over its goodput (before the plan's efficiency)
    fill_s: float  # the reducers' pipeline fill
    steps: float  # messages in a row on the critical path


def rs_chunk_bytes(size: float, reducers: int) -> float:
    """The reduction server's default chunk for an all-reduce of `size` bytes."""
    return min(max(size / reducers / _RS_CHUNKS_PER_SHARE, _RS_CHUNK_MIN), _RS_CHUNK_MAX)


def rank_hosts(workers: int, ranks_per_host: int, hosts_per_rack: Optional[int], rank_order: str) -> Tuple[int, ...]:
    """Each rank's host index. block: rank // K. interleaved: rank i on the (i mod W)-th host of
    the hosts taken round-robin over the racks (racks of `hosts_per_rack` consecutive hosts, the
    last one possibly smaller; 2 racks of 4: hosts 0, 4, 1, 5, 2, 6, 3, 7), as
    benchmarks/_checks.py's Layout places ranks for compare.py --rank-order interleaved."""
    if rank_order == "block":
        return tuple(rank // ranks_per_host for rank in range(workers * ranks_per_host))
    per_rack = hosts_per_rack or workers
    racks = [range(first, min(first + per_rack, workers)) for first in range(0, workers, per_rack)]
    order = [rack[j] for j in range(per_rack) for rack in racks if j < len(rack)]
    return tuple(order[rank % workers] for rank in range(workers * ranks_per_host))


@functools.lru_cache(maxsize=64)
def _ring_crossings(workers: int, ranks_per_host: int, hosts_per_rack: Optional[int],
                    rank_order: str) -> Tuple[int, int, bool]:
    """The flat ring's hops (rank i to rank i+1 mod n) in this rank order: the most that leave
    one host, the most that leave one rack, and whether any stays inside a host."""
    host_of = rank_hosts(workers, ranks_per_host, hosts_per_rack, rank_order)
    rack_of = [host // (hosts_per_rack or workers) for host in range(workers)]
    out_of_host = [0] * workers
    out_of_rack = [0] * (max(rack_of) + 1)
    inside = False
    for rank, host in enumerate(host_of):
        to = host_of[(rank + 1) % len(host_of)]
        if to == host:
            inside = True
            continue
        out_of_host[host] += 1
        if rack_of[to] != rack_of[host]:
            out_of_rack[rack_of[host]] += 1
    return max(out_of_host), max(out_of_rack), inside


@functools.lru_cache(maxsize=64)
def _hierarchy(workers: int, ranks_per_host: int, hosts_per_rack: Optional[int]) -> Tuple[Tuple[str, int], ...]:
    """The planner's levels for ranks in host order (and rack order): (child kind, largest group)."""
    def label(host: int) -> str:
        return f"host{host}" if hosts_per_rack is None else f"rack{host // hosts_per_rack}/host{host}"
    levels = planner.plan([label(h) for h in range(workers) for _ in range(ranks_per_host)]).levels
    return tuple((level.child, max(len(g) for g in level.groups)) for level in levels)


def link_bytes(plan: str, cluster: Cluster, size: float) -> Tuple[Dict[str, float], float]:
    """Bytes each way per link of each kind for one all-reduce of `size` bytes, and the steps
    in a row. Link kinds: "intra" (a rank's), "nic" (a worker host's), "uplink" (a rack's),
    "reducer nic", "reducer sum" (bytes one reducer sums)."""
    c = cluster
    n = c.ranks
    if plan == "ring":
        hop = 2 * (n - 1) / n * size
        hosts, racks, inside = _ring_crossings(c.workers, c.ranks_per_host, c.hosts_per_rack, c.rank_order)
        links = {"intra": hop if inside else 0.0, "nic": hop * hosts, "uplink": hop * racks}
        return links, 2 * (n - 1)
    if plan == "hierarchical":
        links = {"intra": 0.0, "nic": 0.0, "uplink": 0.0}
        steps = 0.0
        for child, m in _hierarchy(c.workers, c.ranks_per_host, c.hosts_per_rack):
            out_of_child = 2 * (m - 1) / m * size
            steps += 2 * (m - 1)
            if child == "rank":
                links["intra"] += out_of_child
            elif child == "host":
                links["nic"] += out_of_child
            else:  # a rack: through its uplink, its hosts sharing the traffic
                links["uplink"] += out_of_child
                links["nic"] += out_of_child / (c.hosts_per_rack or 1)
        return links, steps
    if plan in ("reduction_server", "hierarchical+reduction_server"):
        if c.reducers < 1:
            raise ValueError(f"{plan} needs reducers")
        local = plan != "reduction_server" and c.ranks_per_host > 1
        senders = c.workers if local else n  # who talks to the reducers
        per_reducer = senders * size / c.reducers
        links = {"intra": 2 * (c.ranks_per_host - 1) / c.ranks_per_host * size if local else 0.0,
                 "nic": size * (1 if local else c.ranks_per_host),
                 "reducer nic": per_reducer, "reducer sum": per_reducer}
        # Reducers spread over the racks: a rack's traffic to those of the other racks leaves by its uplink.
        links["uplink"] = links["nic"] * (c.hosts_per_rack or 0) * (c.racks - 1) / c.racks
        return links, 2 * (c.ranks_per_host - 1) * local
    raise ValueError(f"unknown plan {plan!r}; plans: {', '.join(PLANS)}")


def allreduce_time(plan: str, cluster: Cluster, size: float, calibration: Calibration) -> Result:
    """The modelled time of one all-reduce of `size` bytes on the wire under `plan`."""
    c = cluster
    if c.ranks == 1 or size <= 0:
        return Result(plan, 0.0, "none", 0.0, 0.0, 0)
    links, steps = link_bytes(plan, c, size)
    rate = {"intra": c.intra_Bps, "nic": c.nic_Bps, "uplink": c.uplink_Bps,
            "reducer nic": c.reducer_nic_Bps, "reducer sum": c.reducer_sum_Bps}
    times = {kind: moved / rate[kind] for kind, moved in links.items() if moved > 0}
    bottleneck = max(times, key=times.get)
    fill = 0.0
    efficiency = calibration.ring_efficiency
    if plan not in ("ring", "hierarchical"):
        steps += calibration.rs_steps
        fill = 2 * rs_chunk_bytes(size, c.reducers) / min(c.nic_Bps, c.reducer_nic_Bps)
        efficiency = calibration.rs_efficiency
    seconds = steps * c.alpha_s + fill + times[bottleneck] / efficiency
    return Result(plan, seconds, bottleneck, times[bottleneck], fill, steps)


def step_time(compute_s: float, allreduce_s: float, overlap: float = 0.0) -> float:
    """A training step's time: the compute, with the all-reduce hidden behind `overlap` of it."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be within [0, 1], not {overlap}")
    return compute_s * (1 - overlap) + max(compute_s * overlap, allreduce_s)
