#include "algorithms/algorithm.h"

namespace collectives {

void barrier_dissemination(const AlgorithmContext& ctx) {
  const int size = ctx.size(), rank = ctx.rank();
  // Round k: tell rank+2^k, hear from rank-2^k. After round k each rank has (indirectly)
  // heard from the 2^(k+1) ranks before it, so after ceil(log2(size)) rounds from all.
  uint32_t round = 0;
  for (int distance = 1; distance < size; distance *= 2, ++round) {
    FrameHeader header = ctx.tag.header(round, 0);
    auto sent = ctx.transport.send((rank + distance) % size, header, nullptr);
    auto heard = ctx.transport.recv((rank - distance % size + size) % size, header, nullptr);
    ctx.wait(heard);
    ctx.wait(sent);
  }
}

}  // namespace collectives
