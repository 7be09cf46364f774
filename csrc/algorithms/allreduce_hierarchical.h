// The hierarchical (multi-layer ring) all-reduce: the plan (hierarchy.h) both ways, up and down,
// over the buffer's pieces, the levels pipelined. Op avg divides once, at the top, by the
// communicator's size.
//
// Reduction order: each piece is reduced as the plan reduces a buffer of its own (hierarchy.h),
// every ring adding in ring order, in the buffer's dtype; the pieces are fixed by the count and
// the dtype's size alone (Hierarchy::pieces), so every run of the same call gives the same bits,
// whatever the segment size or the timing.
#pragma once

#include "algorithms/allreduce.h"
#include "algorithms/hierarchy.h"

namespace collectives {

class HierarchicalAllreduce : public DirectAllreduce {
 public:
  // `hierarchy`: the communicator's plan, which outlives this object.
  explicit HierarchicalAllreduce(Hierarchy& hierarchy) : hierarchy_(hierarchy) {}

  const char* name() const override { return hierarchy_.description().c_str(); }
  void run(const AlgorithmContext& ctx, void* data, size_t count) override;
  const std::vector<Hierarchy::LevelShape>& shape() const { return hierarchy_.shape(); }

 private:
  Hierarchy& hierarchy_;
};

}  // namespace collectives
