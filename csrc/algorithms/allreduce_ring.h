// The pipelined ring all-reduce (ring.h): reduce-scatter, then all-gather. Bandwidth-optimal
// (each rank sends 2(n-1)/n of the buffer) at the price of 2(n-1) message latencies.
#pragma once

#include "algorithms/allreduce.h"

namespace collectives {

class RingAllreduce : public DirectAllreduce {
 public:
  const char* name() const override { return "ring"; }
  void run(const AlgorithmContext& ctx, void* data, size_t count) override;
};

}  // namespace collectives
