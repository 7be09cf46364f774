#include "algorithms/select.h"

#include <algorithm>

#include "algorithms/allreduce_hierarchical.h"

namespace collectives {
namespace {

double message_time(const CostModel& cost, double messages, double bytes_per_message) {
  return messages * (cost.alpha_seconds + bytes_per_message * cost.beta_seconds_per_byte);
}

/*
 * The plan's time for `ways` passes (1: a reduce-scatter or an all-gather; 2: both, an all-reduce)
 * over `bytes`: each level's ring takes m-1 steps per pass, m its largest group. A level below the
 * top cuts what it holds into `parts` blocks, and the parts * (parts of the levels below) rings
 * that run at once share the link of the node they leave (a host's NIC, a rack's uplink):
 * together they move bytes / parts per step over it, whatever the level. The top moves bytes / m
 * per step likewise.
 */
double hierarchy_time(const std::vector<Hierarchy::LevelShape>& shape, double bytes, double ways) {
  double time = 0;
  for (const auto& level : shape) time += message_time(level.cost, ways * (level.largest - 1), bytes / level.parts);
  return time;
}

}  // namespace

AllreduceAlgorithm& select_allreduce(const AllreduceCandidates& candidates, size_t count,
                                     DataType dtype, int group_size, const CostModel& cost) {
  if (candidates.reduction_server) return *candidates.reduction_server;
  const int n = group_size;
  if (n < 2) return candidates.ring;
  if (candidates.board && count * element_size(dtype) <= candidates.board_up_to_bytes) return *candidates.board;
  const double bytes = static_cast<double>(count) * element_size(dtype);
  auto time = [&](double messages, double bytes_per_message) { return message_time(cost, messages, bytes_per_message); };
  // Ring: 2(n-1) steps in a row, each a block of bytes/n. Recursive doubling: log2(p) rounds
  // of the whole buffer, p the largest power of two <= n, and where n is not one, a fold in
  // and a fold back of the whole buffer on the critical path.
  int rounds = 0;
  for (int p = 2; p <= n; p *= 2) ++rounds;
  const bool folds = (n & (n - 1)) != 0;
  const double ring = time(2.0 * (n - 1), bytes / n);
  const double doubling = time(rounds + (folds ? 2 : 0), bytes);
  AllreduceAlgorithm* best = doubling < ring ? &candidates.recursive_doubling : &candidates.ring;
  // Hierarchical: both ways, up (the reduce-scatters, the top's) and down (the all-gathers).
  if (candidates.hierarchical && hierarchy_time(candidates.hierarchical->shape(), bytes, 2) < std::min(ring, doubling)) {
    best = candidates.hierarchical;
  }
  return *best;
}

bool select_hierarchical(CollectiveKind kind, const Hierarchy* hierarchy, size_t bytes, int group_size,
                         const CostModel& cost) {
  if (!hierarchy || group_size < 2) return false;
  if (kind == CollectiveKind::kBroadcast) return true;
  if (!hierarchy->uniform()) return false;
  // The flat ring's one pass: n-1 steps of a rank's block, bytes / n.
  const double n = group_size;
  return hierarchy_time(hierarchy->shape(), static_cast<double>(bytes), 1) < message_time(cost, n - 1, bytes / n);
}

}  // namespace collectives
