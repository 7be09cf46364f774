// The one place where an all-reduce algorithm is chosen, per call. The choice depends only on
// what every rank knows alike (the count, the dtype, the group's size, the settings), so every
// rank makes the same one without a word exchanged.
#pragma once

#include <cstddef>

#include "algorithms/allreduce.h"
#include "common/types.h"

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

struct AllreduceCandidates {
  AllreduceAlgorithm& ring;
  AllreduceAlgorithm& recursive_doubling;
  AllreduceAlgorithm* reduction_server;  // null unless allreduce is to use the reducers
  HierarchicalAllreduce* hierarchical = nullptr;  // null without a plan (allreduce_hierarchical.h)
};

// The reduction server where it is to be used; otherwise the algorithm the cost model expects
// to finish first: the ring, recursive doubling, or the hierarchical plan, whose levels have
// costs of their own (the ring on a tie). `cost` is the model of the links that the flat ring
// and recursive doubling cross.
AllreduceAlgorithm& select_allreduce(const AllreduceCandidates& candidates, size_t count,
                                     DataType dtype, int group_size, const CostModel& cost);

}  // namespace collectives
