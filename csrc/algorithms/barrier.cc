#include <algorithm>

#include "algorithms/algorithm.h"

namespace collectives {

void agree_max(const AlgorithmContext& ctx, uint32_t* values, size_t n, uint32_t first_unit) {
  const int size = ctx.size(), rank = ctx.rank();
  // Round k, with i this rank's index in the group: send what this rank holds to i+2^k, take
  // the max with what i-2^k sent.
  // After round k a rank holds the max over the 2^(k+1) ranks ending at itself (some counted
  // twice once 2^(k+1) > size, which a max does not mind), so after ceil(log2(size))
  // rounds, over all of them.
  std::vector<uint32_t> heard_values(n);
  uint32_t unit = first_unit;
  for (int distance = 1; distance < size; distance *= 2, ++unit) {
    FrameHeader header = ctx.tag.header(unit, n * sizeof(uint32_t));
    auto sent = ctx.send((rank + distance) % size, header, values);
    auto heard = ctx.recv((rank - distance % size + size) % size, header,
                                    heard_values.data());
    ctx.wait(heard);
    ctx.wait(sent);
    for (size_t i = 0; i < n; ++i) values[i] = std::max(values[i], heard_values[i]);
  }
}

void barrier_dissemination(const AlgorithmContext& ctx) { agree_max(ctx, nullptr, 0, 0); }

}  // namespace collectives
