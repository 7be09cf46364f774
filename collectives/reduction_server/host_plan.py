"""The reduction server's host plan (csrc/algorithms/reduction_server.h), from the ranks'
topology labels: where every host holds the same number K >= 2 of ranks and there are several
hosts, the host's ranks reduce-scatter over shared memory, local rank j exchanges only its
1/K of the buffer with the reducers, and the host all-gathers the sums; so each host's NIC moves
S each way instead of K·S. Otherwise the flat plan runs (every worker exchanges its whole
buffer), and `why_flat` says why.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

__all__ = ["HostPlan", "host_plan"]


@dataclasses.dataclass(frozen=True)
class HostPlan:
    hosts: Optional[List[List[int]]]  # each host's ranks in order, hosts by lowest rank; None: flat
    why_flat: str  # empty where the host plan runs

    @property
    def algorithm(self) -> str:
        """What comm.algorithm calls it."""
        return "reduction_server:host" if self.hosts else "reduction_server"


def host_plan(topology: Sequence[str]) -> HostPlan:
    """The plan for ranks 0..len(topology)-1 with these labels (comm.topology: a rank's label
    names its host, and the levels above it); equal on every rank."""
    by_label: Dict[str, List[int]] = {}
    for rank, label in enumerate(topology):
        by_label.setdefault(label, []).append(rank)
    hosts = list(by_label.values())  # in the order of their lowest ranks
    sizes = sorted({len(h) for h in hosts})
    if len(hosts) < 2:
        return HostPlan(None, "every rank is on one host")
    if sizes[-1] < 2:
        return HostPlan(None, "every host holds one rank")
    if len(sizes) > 1:
        return HostPlan(None, f"the hosts hold {sizes[0]}-{sizes[-1]} ranks, and the host plan needs the same "
                              "number on every host")
    return HostPlan(hosts, "")
