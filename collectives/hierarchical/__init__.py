"""Topology-aware multi-layer rings: the hierarchical all-reduce's planner (planner.py).

The data plane is in the core (csrc/algorithms/allreduce_hierarchical.h); this package turns
the ranks' topology labels (``comm.topology``) into the plan it runs.
"""

from .planner import Level, Plan, plan

__all__ = ["Level", "Plan", "plan", "core_plan", "SHM_COST"]


# The cost model's links (csrc/algorithms/select.h): a message between ranks of one host over
# shared memory costs a few microseconds to start and moves several GB/s, against the network's
# 25 us and 1 GB/s (select.h's CostModel). The levels above the host cross the network.
SHM_COST = (5e-6, 2.5e-10)


def core_plan(plan: Plan, *, network_cost, forced: bool, host_over_shm: bool):
    """The core's form of `plan` (collectives._core.HierarchyPlan). `forced`: levels that cost
    nothing, so that the one selection place (select.cc) always takes it (the flat links then
    cost a second per message: the caller sets that)."""
    from .. import _core

    core = _core.HierarchyPlan()
    core.description = plan.description
    levels = []
    for level in plan.levels:
        core_level = _core.HierarchyLevel()
        core_level.name = level.name
        core_level.groups = [list(g) for g in level.groups]
        if forced:
            core_level.cost = (0.0, 0.0)
        else:
            core_level.cost = SHM_COST if level.name == "host" and host_over_shm else network_cost
        levels.append(core_level)
    core.levels = levels
    return core
