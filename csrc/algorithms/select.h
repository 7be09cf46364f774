// The one place where an all-reduce algorithm is chosen, per call. The choice depends only on
// what every rank knows alike (the count, the dtype, the group's size, the settings), so every
// rank makes the same one without a word exchanged.
#pragma once

#include <cstddef>

#include "algorithms/allreduce.h"
#include "common/types.h"
#include "transport/frame.h"

namespace collectives {

// Hockney's alpha-beta model of a message: alpha seconds to get it going, beta seconds per
// byte on the way. Reduction costs per byte are left out: both candidates reduce about as
// many bytes per rank, against many more that they move.
struct CostModel {
  // A loopback or same-rack TCP message between two processes, through the transport's
  // progress threads; about a 10 Gbit/s link.
  double alpha_seconds = 25e-6;
  double beta_seconds_per_byte = 1e-9;
};

class HierarchicalAllreduce;
class Hierarchy;

struct AllreduceCandidates {
  AllreduceAlgorithm& ring;
  AllreduceAlgorithm& recursive_doubling;
  AllreduceAlgorithm* reduction_server;  // null unless allreduce is to use the reducers
  HierarchicalAllreduce* hierarchical = nullptr;  // null without a plan (allreduce_hierarchical.h)
  AllreduceAlgorithm* board = nullptr;  // null without a board (allreduce_board.h)
  size_t board_up_to_bytes = 0;         // the board takes all-reduces of up to this many bytes
};

// The reduction server where it is to be used; otherwise the board up to its size; otherwise
// the algorithm the cost model expects to finish first: the ring, recursive doubling, or the
// hierarchical plan, whose levels have costs of their own (the ring on a tie). `cost` is the model of the links that the flat ring
// and recursive doubling cross.
AllreduceAlgorithm& select_allreduce(const AllreduceCandidates& candidates, size_t count,
                                     DataType dtype, int group_size, const CostModel& cost);

// Whether an all-gather, a reduce-scatter or a broadcast of `bytes` in all (every rank's block,
// for the first two) takes the plan (hierarchical_collectives.h) over the flat ring or chain.
// All-gather and reduce-scatter: where the plan is uniform and the cost model expects its one
// way (down, or up) to finish first. Broadcast: wherever there is a plan: its chain makes the
// flat chain's hops, and crosses no link more often than it.
bool select_hierarchical(CollectiveKind kind, const Hierarchy* hierarchy, size_t bytes, int group_size,
                         const CostModel& cost);

}  // namespace collectives
