#include "algorithms/allreduce_hierarchical.h"

namespace collectives {

void HierarchicalAllreduce::run(const AlgorithmContext& ctx, void* data, size_t count) {
  if (count == 0 || ctx.size() == 1) return;  // avg over one rank divides by one
  hierarchy_.run(ctx, static_cast<char*>(data), Hierarchy::pieces(count, element_size(ctx.tag.dtype)),
                 {/*up=*/true, /*down=*/true});
}

}  // namespace collectives
