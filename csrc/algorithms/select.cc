#include "algorithms/select.h"

namespace collectives {

AllreduceAlgorithm& select_allreduce(const AllreduceCandidates& candidates, size_t count,
                                     DataType dtype, int group_size, const CostModel& cost) {
  if (candidates.reduction_server) return *candidates.reduction_server;
  const int n = group_size;
  if (n < 2) return candidates.ring;
  const double bytes = static_cast<double>(count) * element_size(dtype);
  auto time = [&](double messages, double bytes_per_message) {
    return messages * (cost.alpha_seconds + bytes_per_message * cost.beta_seconds_per_byte);
  };
  // Ring: 2(n-1) steps in a row, each a block of bytes/n. Recursive doubling: log2(p) rounds
  // of the whole buffer, p the largest power of two <= n, and where n is not one, a fold in
  // and a fold back of the whole buffer on the critical path.
  int rounds = 0;
  for (int p = 2; p <= n; p *= 2) ++rounds;
  const bool folds = (n & (n - 1)) != 0;
  const double ring = time(2.0 * (n - 1), bytes / n);
  const double doubling = time(rounds + (folds ? 2 : 0), bytes);
  return doubling < ring ? candidates.recursive_doubling : candidates.ring;
}

}  // namespace collectives
