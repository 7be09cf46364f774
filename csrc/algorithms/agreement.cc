#include "algorithms/algorithm.h"

namespace collectives {

void agree_on_call(const AlgorithmContext& ctx) {
  const int size = ctx.size(), rank = ctx.rank();
  if (size == 1) return;
  /*
   * Index i sends an empty frame with its own header to i+1 and checks the one from i-1. If
   * any two ranks called differently (another root, count, dtype or op), then going round the
   * ring from one to the other some neighbours i-1, i differ, and rank i's transport refuses
   * the frame before anything else happens: it fails, and every peer is told why. One round
   * of the smallest messages, not a dissemination: one rank that finds out is enough.
   */
  const FrameHeader header = ctx.tag.header(kAgreementUnit, 0);
  auto sent = ctx.send((rank + 1) % size, header, nullptr);
  auto heard = ctx.recv((rank - 1 + size) % size, header, nullptr);
  ctx.wait(heard);
  ctx.wait(sent);
}

}  // namespace collectives
