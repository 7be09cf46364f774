#include "algorithms/allreduce_recursive_doubling.h"

#include <algorithm>
#include <cstring>

namespace collectives {

void RecursiveDoublingAllreduce::run(const AlgorithmContext& ctx, void* data, size_t count) {
  const int size = ctx.size(), index = ctx.rank();
  if (count == 0 || size == 1) return;  // avg over one rank divides by one
  const size_t bytes = count * element_size(ctx.tag.dtype);
  char* mine = static_cast<char*>(data);
  ctx.scratch.resize(std::max(ctx.scratch.size(), bytes));
  char* theirs = ctx.scratch.data();
  auto header = [&](uint32_t unit) { return ctx.tag.header(unit, bytes); };
  // mine = (lower group's value) op (upper group's value), whichever of the two is this rank's.
  auto combine = [&](bool theirs_is_lower) {
    if (theirs_is_lower) {
      reduce_into(theirs, mine, count, ctx.tag.dtype, ctx.tag.op);
      std::memcpy(mine, theirs, bytes);
    } else {
      reduce_into(mine, theirs, count, ctx.tag.dtype, ctx.tag.op);
    }
  };

  /*
   * The rounds need a power of two of ranks: p, the largest one <= size, and rem = size - p.
   * The first 2*rem indices fold in pairs: 2k sends its buffer to 2k+1 and sits the rounds
   * out; 2k+1 combines the two and takes part as virtual rank k. Indices from 2*rem on take
   * part as virtual rank index - rem. Virtual ranks keep the order of the indices (virtual v is
   * index 2v+1 below rem, v+rem from there), so "lower" means the same in both numberings.
   *
   * Round k (mask 2^k): virtual v swaps with v ^ mask. Before it, v holds the reduction over
   * the 2^k virtual ranks that agree with v above bit k, and so does its partner over the
   * adjacent 2^k; both combine lower block first, and after the round all 2^(k+1) hold the
   * same bits. After log2(p) rounds every virtual rank holds the reduction over all of them.
   * Then 2k+1 sends the result back to 2k.
   *
   * Units: 0 for the fold in, 1..log2(p) for the rounds, log2(p)+1 for the fold back.
   */
  int pof2 = 1, rounds = 0;
  for (; pof2 * 2 <= size; pof2 *= 2) ++rounds;
  const int rem = size - pof2;
  const bool folded = index < 2 * rem;
  const bool sits_out = folded && index % 2 == 0;
  if (folded) {
    if (sits_out) {
      ctx.wait(ctx.send(index + 1, header(0), mine));
    } else {
      ctx.wait(ctx.recv(index - 1, header(0), theirs));
      combine(true);
    }
  }
  if (!sits_out) {
    const int virtual_rank = folded ? index / 2 : index - rem;
    uint32_t unit = 1;
    for (int mask = 1; mask < pof2; mask <<= 1, ++unit) {
      const int partner_virtual = virtual_rank ^ mask;
      const int partner = partner_virtual < rem ? 2 * partner_virtual + 1 : partner_virtual + rem;
      auto sent = ctx.send(partner, header(unit), mine);
      auto heard = ctx.recv(partner, header(unit), theirs);
      ctx.wait(heard);
      ctx.wait(sent);  // mine changes next: its send must be out
      combine(partner_virtual < virtual_rank);
      if (ctx.debug) ctx.log("recursive doubling round " + std::to_string(unit) + "/" +
                             std::to_string(rounds) + " with " + ctx.peer_name(partner));
    }
  }
  const uint32_t back = static_cast<uint32_t>(rounds) + 1;
  if (folded) {
    if (sits_out) {
      ctx.wait(ctx.recv(index + 1, header(back), mine));
    } else {
      ctx.wait(ctx.send(index - 1, header(back), mine));
    }
  }
  if (ctx.tag.op == ReduceOp::kAvg) divide(mine, count, ctx.tag.dtype, size);
}

}  // namespace collectives
