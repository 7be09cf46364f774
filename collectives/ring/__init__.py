"""The ring family's Python face: the pipelined ring and recursive doubling, and the cost model
by which ``auto`` chooses between them per call.

The data plane and the one place where the choice is made are in the core
(csrc/algorithms/allreduce_ring.h, allreduce_recursive_doubling.h, select.h). Its settings are
COLLECTIVES_RING_SEGMENT_BYTES (the pipelining granularity; unset: chosen per message size) and
COLLECTIVES_CONNECTIONS_PER_PEER (TCP connections per pair of ranks), and the algorithm.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .. import _core

__all__ = ["DEFAULT_COST", "cost", "crossover_bytes", "choices"]

# The core's cost model (select.h: alpha seconds per message, beta seconds per byte): estimates
# for a loopback or same-rack TCP message through the transports' progress threads.
_defaults = _core.Options()
DEFAULT_COST: Tuple[float, float] = (_defaults.cost_alpha_seconds, _defaults.cost_beta_seconds_per_byte)
del _defaults


def cost(algorithm: str) -> Tuple[float, float]:
    """The cost model that makes the selection place run `algorithm` of the ring family: a
    forced one is a model under which it always wins, so that select.h stays the only place
    that chooses; "auto" (and algorithms outside the family) take the default."""
    if algorithm == "ring":
        return 0.0, 1.0  # messages free, bytes dear: the ring moves the fewest bytes
    if algorithm == "recursive_doubling":
        return 1.0, 0.0  # bytes free, messages dear: recursive doubling sends the fewest
    return DEFAULT_COST


def crossover_bytes(group_size: int, model: Tuple[float, float] = DEFAULT_COST,
                    limit: int = 1 << 40) -> Optional[int]:
    """The smallest message (bytes) for which auto takes the ring over recursive doubling on a
    flat group of `group_size` ranks; None if none up to `limit` (found by bisection: the choice
    flips once, from recursive doubling for small messages to the ring for large ones)."""
    def ring(n: int) -> bool:
        return _core.ring_family_choice(n, group_size, *model) == "ring"

    if ring(0):
        return 0
    low, high = 0, limit  # recursive doubling at low; the ring at high, or nothing flips
    if not ring(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if ring(middle) else (middle, high)
    return high


def choices(group_sizes: List[int] = (2, 4, 8, 16, 64, 256)) -> Dict[str, Any]:
    """What collectives-info shows of auto's choice on flat groups under the default model."""
    alpha, beta = DEFAULT_COST
    return {
        "cost_model": {"alpha_seconds": alpha, "beta_seconds_per_byte": beta,
                       "source": "estimates for loopback or same-rack TCP (csrc/algorithms/select.h)"},
        "ring_from_bytes": {str(n): crossover_bytes(n) for n in group_sizes},
    }
