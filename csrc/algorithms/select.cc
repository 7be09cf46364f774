#include "algorithms/select.h"

#include <algorithm>

#include "algorithms/allreduce_hierarchical.h"

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
  AllreduceAlgorithm* best = doubling < ring ? &candidates.recursive_doubling : &candidates.ring;
  if (candidates.hierarchical) {
    /*
     * Hierarchical: each level's ring takes 2(m-1) steps, m its largest group (the top: one
     * all-reduce; below it: a reduce-scatter up and an all-gather down). A level below the top
     * cuts what it holds into `parts` blocks, and the parts * (parts of the levels below) rings
     * that run at once share the link of the node they leave (a host's NIC, a rack's uplink):
     * together they move bytes / parts per step over it, whatever the level. The top moves
     * bytes / m per step likewise.
     */
    double hierarchical = 0;
    for (const auto& level : candidates.hierarchical->shape()) {
      const double steps = 2.0 * (level.largest - 1);
      hierarchical += steps * (level.cost.alpha_seconds + bytes / level.parts * level.cost.beta_seconds_per_byte);
    }
    if (hierarchical < std::min(ring, doubling)) best = candidates.hierarchical;
  }
  return *best;
}

}  // namespace collectives
