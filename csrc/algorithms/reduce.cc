#include <cstring>

#include "algorithms/ring.h"

namespace collectives {

void reduce_to_root(const AlgorithmContext& ctx, void* data, size_t count, int root) {
  agree_on_call(ctx);
  const int size = ctx.size(), rank = ctx.rank();
  if (count == 0 || size == 1) return;
  const size_t element = element_size(ctx.tag.dtype);
  /*
   * Half an all-reduce, then a gather: the ring's reduce-scatter leaves block i (of size()
   * near-equal blocks, even_blocks) reduced over every rank at index i, which sends it to the
   * root; the root receives block r from index r into place. Each rank moves (n-1)/n of the
   * buffer in the ring and 1/n to the root, which receives (n-1)/n: bandwidth-optimal as the
   * ring. The root reduces in place; every other rank reduces a copy, since a reduce leaves
   * the non-roots' buffers as they were.
   */
  char* work = static_cast<char*>(data);
  std::vector<char> copy;
  if (rank != root) {
    copy.assign(work, work + count * element);
    work = copy.data();
  }
  const std::vector<size_t> offsets = even_blocks(count, size);
  std::vector<RingStep> steps;
  append_reduce_scatter_steps(ctx, steps);
  run_ring(ctx, work, offsets, steps);
  // Units above the ring's (whose largest is below size * blocks of segments, all below this).
  constexpr uint32_t kToRootUnit = 0x80000000u;
  std::vector<TransportRequest> requests;
  auto block = [&](int b) { return std::make_pair(work + offsets[b] * element, (offsets[b + 1] - offsets[b]) * element); };
  if (rank != root) {
    auto [at, bytes] = block(rank);
    post_pieces(ctx, /*send=*/true, root, at, bytes, kToRootUnit, requests);
  } else {
    for (int r = 0; r < size; ++r) {
      if (r == root) continue;
      auto [at, bytes] = block(r);
      post_pieces(ctx, /*send=*/false, r, at, bytes, kToRootUnit, requests);
    }
  }
  for (auto& request : requests) ctx.wait(request);
}

}  // namespace collectives
