#include <cstring>

#include "algorithms/ring.h"

namespace collectives {

void reduce_scatter_ring(const AlgorithmContext& ctx, const void* input, void* output,
                         size_t count) {
  const size_t bytes = count * element_size(ctx.tag.dtype);
  const size_t rank_offset = ctx.rank() * bytes;
  if (count == 0) return;
  if (ctx.size() == 1) {
    std::memmove(output, input, bytes);
    return;
  }
  // The ring reduces in place, and the caller's input must stay as it was.
  std::vector<char> work(static_cast<const char*>(input),
                         static_cast<const char*>(input) + bytes * ctx.size());
  std::vector<RingStep> steps;
  append_reduce_scatter_steps(ctx, steps);
  run_ring(ctx, work.data(), even_blocks(count * ctx.size(), ctx.size()), steps);
  std::memcpy(output, work.data() + rank_offset, bytes);
}

}  // namespace collectives
