#include "algorithms/allreduce_ring.h"

#include "algorithms/ring.h"

namespace collectives {

void RingAllreduce::run(const AlgorithmContext& ctx, void* data, size_t count) {
  if (count == 0 || ctx.size() == 1) return;  // avg over one rank divides by one
  std::vector<RingStep> steps;
  append_reduce_scatter_steps(ctx, steps);
  append_allgather_steps(ctx, steps);
  run_ring(ctx, static_cast<char*>(data), even_blocks(count, ctx.size()), steps);
}

}  // namespace collectives
