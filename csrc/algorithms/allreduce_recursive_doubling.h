// Recursive doubling (the scheme of MPICH's MPIR_Allreduce_intra_recursive_doubling): log2(n)
// rounds in which every rank swaps its whole buffer with one partner and combines. Each rank
// sends log2(n) times the buffer, against the ring's 2(n-1)/n, but waits on log2(n) messages
// instead of 2(n-1): the algorithm for small messages, where latency is the cost.
//
// Every rank ends with the same bits: partners combine in one order (the lower group's value
// first), so the result is one fixed tree of operations over the ranks in group order.
#pragma once

#include "algorithms/allreduce.h"

namespace collectives {

class RecursiveDoublingAllreduce : public DirectAllreduce {
 public:
  const char* name() const override { return "recursive_doubling"; }
  void run(const AlgorithmContext& ctx, void* data, size_t count) override;
};

}  // namespace collectives
