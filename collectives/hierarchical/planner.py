"""The hierarchical all-reduce's plan, from the ranks' topology labels.

A label is COLLECTIVES_TOPOLOGY's levels above the host, outermost first, then the hostname
("zone1/rack2/host5"; collectives._topology). The labels make a tree: ranks under hosts, hosts
under racks, and so on up to one root. Labels of different depths are padded on the outside
with an unnamed level, so that every rank sits at the same depth.

The plan has one level per node depth, lowest first: level 0 runs inside each host, level l
inside each node l levels above the hosts, and the last (the top) among the root's children.
Inside a node, the children are ordered by their lowest rank (ranks of a host by rank), and:

* level 0: one group per host, its ranks in order. Each host's ranks reduce-scatter the buffer
  into ``parts`` blocks, ``parts`` being the fewest ranks on any host (k_min): the host's first
  ``parts`` ranks each end with one block summed over the host; the others (a host's ranks
  beyond k_min) add their data into those blocks and carry nothing across hosts.
* level l above: the carriers of one node l levels up that hold the same block form one group,
  one member from each child, in the children's order; ``parts`` is the fewest children of any
  node of that depth, and again the first ``parts`` members carry a sub-block up.
* the top: the same groups among the root's children, which all-reduce what they carry; then
  every level all-gathers back down.

Levels whose groups all have one member do nothing and are left out (a host per rank, a rack
per host, a single rack). The core runs the plan (csrc/algorithms/allreduce_hierarchical.h) and
checks these rules again.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Level", "Plan", "plan"]

# Names of the levels above the host in descriptions, innermost first (COLLECTIVES_TOPOLOGY's
# values name nodes, not levels); deeper ones are level3, level4, ...
_LEVEL_NAMES = ("host", "rack", "zone")


@dataclasses.dataclass(frozen=True)
class Level:
    name: str  # what its nodes are: "host", "rack", ..., or "top" (the root of the tree)
    child: str  # what their children are: "rank", "host", ...
    groups: Tuple[Tuple[int, ...], ...]  # ranks, each group in ring order
    children: Tuple[int, ...]  # per node of the level, how many children it has

    @property
    def parts(self) -> int:
        return min(len(g) for g in self.groups)

    def describe(self) -> str:
        low, high = min(self.children), max(self.children)
        count = str(low) if low == high else f"{low}-{high}"
        return f"{count} {self.child}s" + ("" if self.name == "top" else f"/{self.name}")


@dataclasses.dataclass(frozen=True)
class Plan:
    levels: Tuple[Level, ...]  # lowest first, the top last; levels that do nothing left out

    @property
    def description(self) -> str:
        """"hierarchical(4 ranks/host x 2 hosts)", "hierarchical(2 ranks/host x 2-3 hosts/rack x
        2 racks)": per level, the children of its nodes (a range where they differ)."""
        return f"hierarchical({' x '.join(level.describe() for level in self.levels)})"

    @property
    def shares(self) -> bool:
        """Whether there is anything hierarchical about it: two levels or more."""
        return len(self.levels) >= 2


def _name(up: int) -> str:
    """The name of the nodes `up` levels above the ranks' hosts (0: the hosts)."""
    return _LEVEL_NAMES[up] if up < len(_LEVEL_NAMES) else f"level{up}"


def plan(labels: Sequence[str]) -> Plan:
    """The plan for ranks 0..len(labels)-1 with these labels; equal on every rank that has them."""
    paths = [tuple(label.split("/")) for label in labels]
    depth = max(len(p) for p in paths)
    paths = [("",) * (depth - len(p)) + p for p in paths]  # pad on the outside

    def node(rank: int, up: int) -> Tuple[str, ...]:
        """The node a rank sits in `up` levels above its host: a prefix of its path (-1: itself)."""
        return paths[rank][:depth - up] if up >= 0 else (*paths[rank], str(rank))

    levels: List[Level] = []
    # Carriers: rank -> the positions it took in its groups so far (which block it holds).
    carriers: Dict[int, Tuple[int, ...]] = {r: () for r in range(len(labels))}
    for up in range(depth + 1):
        # Each node of this level, with its children (ranks, or the nodes one level down) in the
        # order of their lowest rank; every child holds one carrier of each block.
        children: Dict[Tuple[str, ...], List[Tuple[str, ...]]] = {}
        for rank in sorted(carriers):
            siblings = children.setdefault(node(rank, up), [])
            if node(rank, up - 1) not in siblings:
                siblings.append(node(rank, up - 1))
        blocks: Dict[Tuple[Tuple[str, ...], Tuple[int, ...]], List[int]] = {}
        for rank in sorted(carriers, key=lambda r: (children[node(r, up)].index(node(r, up - 1)), r)):
            blocks.setdefault((node(rank, up), carriers[rank]), []).append(rank)
        # Groups in the order of their nodes (by lowest rank), then of their blocks.
        groups = [tuple(blocks[key]) for key in sorted(blocks, key=lambda k: (min(blocks[k]), k[1]))]
        parts = min(len(g) for g in groups)
        top = up == depth
        if any(len(g) > 1 for g in groups):
            levels.append(Level("top" if top else _name(up), "rank" if up == 0 else _name(up - 1), tuple(groups),
                                tuple(len(c) for c in children.values())))
        carriers = {} if top else {r: carriers[r] + (g.index(r),) for g in groups for r in g[:parts]}
    return Plan(tuple(levels))
