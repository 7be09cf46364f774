#include <cstring>

#include "algorithms/ring.h"

namespace collectives {

void allgather_ring(const AlgorithmContext& ctx, const void* input, void* output, size_t count) {
  const size_t bytes = count * element_size(ctx.tag.dtype);
  char* own = static_cast<char*>(output) + ctx.rank() * bytes;
  if (count == 0) return;
  if (own != input) std::memmove(own, input, bytes);
  if (ctx.size() == 1) return;
  std::vector<RingStep> steps;
  append_allgather_steps(ctx, steps);
  run_ring(ctx, static_cast<char*>(output), even_blocks(count * ctx.size(), ctx.size()), steps);
}

}  // namespace collectives
