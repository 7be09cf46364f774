#include "algorithms/allreduce_hierarchical.h"

#include <algorithm>
#include <stdexcept>

#include "algorithms/ring.h"

namespace collectives {
namespace {

std::invalid_argument refused(size_t level, const std::string& name, const std::string& why) {
  return std::invalid_argument("hierarchical plan, level " + std::to_string(level) + " (" + name + "): " + why);
}

/*
 * The blocks a level's ring cuts [lo, hi) into: `parts` near-equal blocks (even_blocks, moved to
 * start at lo), then an empty block at hi for each member from `parts` on. run_ring takes any
 * offsets: a member whose block is empty still passes the others' blocks on, and adds its own
 * data into them, but ends the reduce-scatter holding nothing.
 */
std::vector<size_t> level_blocks(size_t lo, size_t hi, int parts, int members) {
  std::vector<size_t> offsets = even_blocks(hi - lo, parts);
  for (size_t& offset : offsets) offset += lo;
  offsets.resize(members + 1, hi);
  return offsets;
}

}  // namespace

HierarchicalAllreduce::HierarchicalAllreduce(const HierarchyPlan& plan, const Group& group)
    : description_(plan.description.empty() ? "hierarchical" : plan.description) {
  const int size = group.size();
  const size_t levels = plan.levels.size();
  if (levels == 0) throw std::invalid_argument("hierarchical plan without levels");
  // Walk the plan for every rank at once: which ranks carry data to the level (all of them to
  // level 0), and the position each took in its group at every level below, which fixes the
  // range it carries: the members of one group must agree on it.
  std::vector<bool> carries(size, true);
  std::vector<std::vector<int>> positions(size);
  for (size_t l = 0; l < levels; ++l) {
    const HierarchyLevel& level = plan.levels[l];
    const bool top = l + 1 == levels;
    std::vector<bool> member(size, false);
    int parts = size, largest = 0;
    for (const std::vector<int>& g : level.groups) {
      if (g.empty()) throw refused(l, level.name, "an empty group");
      for (int index : g) {
        if (index < 0 || index >= size) {
          throw refused(l, level.name, "rank " + std::to_string(index) + " is not one of the " +
                                           std::to_string(size) + " ranks");
        }
        if (member[index]) throw refused(l, level.name, "rank " + std::to_string(index) + " is in two groups");
        if (!carries[index] || positions[index] != positions[g.front()]) {
          throw refused(l, level.name, "rank " + std::to_string(index) +
                                           " carries no data here, or not the data of its group's first member");
        }
        member[index] = true;
      }
      parts = std::min(parts, static_cast<int>(g.size()));
      largest = std::max(largest, static_cast<int>(g.size()));
    }
    if (top && parts != largest) throw refused(l, level.name, "the top level's groups differ in size");
    for (int index = 0; index < size; ++index) {
      if (carries[index] && !member[index]) {
        throw refused(l, level.name, "rank " + std::to_string(index) + " carries data to this level but is in no group");
      }
    }
    for (const std::vector<int>& g : level.groups) {
      for (size_t p = 0; p < g.size(); ++p) {
        positions[g[p]].push_back(static_cast<int>(p));
        if (top || static_cast<int>(p) >= parts) carries[g[p]] = false;
      }
    }
    for (const std::vector<int>& g : level.groups) {
      if (std::find(g.begin(), g.end(), group.index()) == g.end()) continue;
      std::vector<int> ranks(g.size());
      std::transform(g.begin(), g.end(), ranks.begin(), [&](int index) { return group.peer(index); });
      mine_.emplace_back(std::move(ranks), group.peer(group.index()));
    }
    shape_.push_back({parts, largest, level.cost});
    names_.push_back(level.name);
  }
}

/*
 * Phases, each a ring over this rank's group of one level, run one after the other: the
 * reduce-scatters of levels 0 .. top-1 (as far as this rank carries), the top's all-reduce, and
 * the all-gathers back down. Their frames carry the all-reduce's tag (communicator, sequence
 * number, count, dtype, op) with `root` set to the phase's number, 1 .. 2 * levels - 1 (as the
 * reduction server's recovery re-tags the broadcasts it makes inside an all-reduce): two phases
 * never take each other's messages, even where one pair of ranks meets in both.
 */
void HierarchicalAllreduce::run(const AlgorithmContext& ctx, void* data, size_t count) {
  if (count == 0 || ctx.size() == 1) return;  // avg over one rank divides by one
  char* buffer = static_cast<char*>(data);
  const size_t element = element_size(ctx.tag.dtype);
  const size_t levels = shape_.size(), top = levels - 1;
  // One ring over this rank's group of `level`: its reduce-scatter steps, its all-gather steps
  // or both, less the ring's division for avg (the sum is divided once, at the top).
  auto ring = [&](size_t level, uint32_t number, const char* what, bool reduce_scatter, bool allgather,
                  const std::vector<size_t>& offsets) {
    CollectiveTag tag = ctx.tag;
    tag.root = number;
    const AlgorithmContext sub{ctx.transport, mine_[level], tag, ctx.deadline,
                               ctx.segment_bytes, ctx.scratch, ctx.debug, ctx.interruption};
    std::vector<RingStep> steps;
    if (reduce_scatter) append_reduce_scatter_steps(sub, steps);
    if (allgather) append_allgather_steps(sub, steps);
    for (RingStep& step : steps) step.finalize = false;
    if (ctx.debug) {
      ctx.log(std::string("hierarchical: ") + what + " in the " + names_[level] + " group of " +
              std::to_string(sub.size()) + ", elements " + std::to_string(offsets.front()) + "-" +
              std::to_string(offsets.back()));
    }
    run_ring(sub, buffer, offsets, steps);
  };

  // Up: each level's reduce-scatter hands this rank's block to the level above, while it carries.
  std::vector<std::vector<size_t>> cut;  // the blocks of each level below the top, for the way down
  size_t lo = 0, hi = count;
  for (size_t l = 0; l < top && l < mine_.size(); ++l) {
    const Group& g = mine_[l];
    cut.push_back(level_blocks(lo, hi, shape_[l].parts, g.size()));
    ring(l, static_cast<uint32_t>(l + 1), "reduce-scatter", true, false, cut.back());
    if (l + 1 == mine_.size()) break;  // a member past `parts`: it carries nothing up
    lo = cut.back()[g.index()];
    hi = cut.back()[g.index() + 1];
  }
  // The top: an all-reduce of what is left, among one carrier of each part of the tree.
  if (mine_.size() == levels) {
    const int n = mine_[top].size();
    ring(top, static_cast<uint32_t>(levels), "all-reduce", true, true, level_blocks(lo, hi, n, n));
    if (ctx.tag.op == ReduceOp::kAvg) divide(buffer + lo * element, hi - lo, ctx.tag.dtype, ctx.size());
  }
  // Down: every level all-gathers the blocks it cut.
  for (size_t l = cut.size(); l-- > 0;) {
    ring(l, static_cast<uint32_t>(2 * levels - 1 - l), "all-gather", false, true, cut[l]);
  }
}

}  // namespace collectives
