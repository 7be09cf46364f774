#include "algorithms/hierarchy.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

#include "algorithms/ring.h"
#include "algorithms/stage_board.h"

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

Hierarchy::Hierarchy(const HierarchyPlan& plan, const Group& group)
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
    uniform_ = uniform_ && parts == largest;
  }
  /*
   * In a uniform plan every rank holds a position at every level, p_0 .. p_top, and level l cuts
   * the range it was handed into parts_l equal blocks, handing block p_l up. So the way up ends
   * with block ((p_0 * parts_1 + p_1) * parts_2 + p_2) ... of size() = parts_0 * parts_1 * ...
   * equal blocks: p_0 is the most significant digit, the top's position the least.
   */
  if (uniform_) {
    for (int index = 0; index < size; ++index) {
      int block = 0;
      for (size_t l = 0; l < levels; ++l) block = block * shape_[l].parts + positions[index][l];
      final_block_.push_back(block);
    }
  }
  /*
   * The tree's nodes, from the groups: every rank starts as a node of its own, headed by itself.
   * At each level, a group whose members all head their nodes (the groups of block 0: the hosts'
   * first ranks, the racks' first hosts' first ranks, ...: one member from each child of a node)
   * joins their nodes into one, in the group's order, headed by its first member; the groups of
   * the other blocks join nothing. After the top, one node holds every rank, each node of every
   * level contiguous in it.
   */
  std::vector<std::vector<int>> nodes(size);
  std::vector<int> node_of(size);
  for (int index = 0; index < size; ++index) nodes[index] = {node_of[index] = index};
  for (const HierarchyLevel& level : plan.levels) {
    for (const std::vector<int>& g : level.groups) {
      if (!std::all_of(g.begin(), g.end(), [&](int m) { return node_of[m] == m; })) continue;
      std::vector<int> joined;
      for (int m : g) joined.insert(joined.end(), nodes[m].begin(), nodes[m].end());
      for (int index : joined) node_of[index] = g.front();
      nodes[g.front()] = std::move(joined);
    }
    node_of_.push_back(node_of);
  }
  tree_order_ = nodes[node_of[0]];
  if (static_cast<int>(tree_order_.size()) != size) throw std::invalid_argument("hierarchical plan: not one tree");
}

std::vector<int> Hierarchy::chain_from(int root) const {
  // A rank's distance from the root: the first level after which they share a node (-1: the
  // root itself). Sorting the tree order by it, stably, keeps each node's ranks together, and
  // puts the nodes nearest the root first.
  std::vector<long> distance(tree_order_.size(), static_cast<long>(node_of_.size()));
  for (size_t index = 0; index < distance.size(); ++index) {
    for (size_t l = node_of_.size(); l-- > 0;) {
      if (node_of_[l][index] == node_of_[l][root]) distance[index] = static_cast<long>(l);
    }
  }
  distance[root] = -1;
  std::vector<int> chain(tree_order_);
  std::stable_sort(chain.begin(), chain.end(), [&](int a, int b) { return distance[a] < distance[b]; });
  return chain;
}

size_t Hierarchy::piece_count(size_t bytes) { return std::clamp<size_t>(bytes / kMinPieceBytes, 1, kMaxPieces); }

std::vector<size_t> Hierarchy::pieces(size_t count, size_t element_bytes) {
  return even_blocks(count, static_cast<int>(piece_count(count * element_bytes)));
}

/*
 * Stages. Stage l is this rank's group at level l (mine_[l]); a rank takes part in the levels it
 * carries data to, so in stages 0 .. mine_.size() - 1. Piece i goes up stage by stage: stage l's
 * reduce-scatter of piece i waits for stage l - 1's of the same piece, and hands it block
 * mine_[l].index() of it; the top's ring (reduce-scatter, all-gather or both, as the ways say)
 * waits for the stage below too; on the way down, stage l's all-gather of piece i waits for the
 * piece to be complete in stage l + 1's range. Each stage runs its rings one after the other,
 * every piece up, then every piece down (the top: its one ring per piece): since a pair of ranks
 * meets in one level only (its members are in one node below and different ones above), the
 * messages between any two ranks come from one stage, in the same order on both sides, which is
 * what the transport's in-order matching needs; and a stage's frames carry its phase and piece
 * in the tag's `root` (piece * 2L + phase, L the plan's levels, phases 1 .. L - 1 up, L the top,
 * L + 1 .. 2L - 1 down): two rings never take each other's messages. Every rank of a group runs
 * the same pieces in the same order, so no stage waits on one that waits on it.
 *
 * With one piece, or one stage, there is nothing to overlap: the caller's thread runs the stages
 * one after the other. Otherwise every stage but the lowest has a thread of its own, and the
 * caller's thread runs the lowest (asking its interruption between waits). The first stage to
 * fail records its error and aborts the transport, so that the others' waits end at once; the
 * caller's thread joins them all and raises that error.
 */
void Hierarchy::run(const AlgorithmContext& ctx, char* buffer, const std::vector<size_t>& pieces, HierarchyWays ways) {
  const size_t levels = shape_.size(), top = levels - 1, stages = mine_.size();
  const size_t count = pieces.size() - 1;  // pieces
  const size_t element = element_size(ctx.tag.dtype);
  // blocks[l][i]: the blocks of stage l's ring over piece i. Piece i enters stage 0 as
  // [pieces[i], pieces[i + 1]); each stage hands block mine_[l].index() of it up.
  std::vector<std::vector<std::vector<size_t>>> blocks(stages, std::vector<std::vector<size_t>>(count));
  for (size_t i = 0; i < count; ++i) {
    size_t lo = pieces[i], hi = pieces[i + 1];
    for (size_t l = 0; l < stages; ++l) {
      const int members = mine_[l].size();
      blocks[l][i] = level_blocks(lo, hi, l == top ? members : shape_[l].parts, members);
      lo = blocks[l][i][mine_[l].index()];
      hi = blocks[l][i][mine_[l].index() + 1];
    }
  }
  if (scratch_.size() < stages) scratch_.resize(stages);
  StageBoard board(stages);

  // Stage l's rings, every piece, one way (`up`; the top: both, as `ways` says).
  auto run_stage = [&](size_t l, bool up, Interruption* interruption) {
    const bool is_top = l == top;
    for (size_t i = 0; i < count; ++i) {
      const std::vector<size_t>& offsets = blocks[l][i];
      if ((is_top ? ways.up : up) && l > 0) board.await(true, l - 1, i, ctx.deadline, interruption);
      if (!is_top && !up && l + 1 < stages) board.await(false, l + 1, i, ctx.deadline, interruption);
      const uint32_t phase = static_cast<uint32_t>(is_top ? levels : up ? l + 1 : 2 * levels - 1 - l);
      CollectiveTag tag = ctx.tag;
      tag.root = static_cast<uint32_t>(i * 2 * levels) + phase;
      const AlgorithmContext sub{ctx.transport, mine_[l], tag, ctx.deadline, ctx.segment_bytes,
                                 scratch_[l], ctx.debug, interruption};
      std::vector<RingStep> steps;
      if (is_top ? ways.up : up) append_reduce_scatter_steps(sub, steps);
      if (is_top ? ways.down : !up) append_allgather_steps(sub, steps);
      for (RingStep& step : steps) step.finalize = false;  // the sum is divided once, at the top
      if (ctx.debug) {
        const char* what = !is_top ? (up ? "reduce-scatter" : "all-gather")
                                   : ways.up && ways.down ? "all-reduce" : ways.up ? "reduce-scatter" : "all-gather";
        ctx.log(std::string("hierarchical: ") + what + " in the " + names_[l] + " group of " +
                std::to_string(sub.size()) + ", piece " + std::to_string(i + 1) + "/" + std::to_string(count) +
                ", elements " + std::to_string(offsets.front()) + "-" + std::to_string(offsets.back()));
      }
      run_ring(sub, buffer, offsets, steps);
      if (is_top && ways.up && ctx.tag.op == ReduceOp::kAvg) {
        // Both ways: the whole range is complete here; up only: this rank's block.
        const size_t lo = ways.down ? offsets.front() : offsets[sub.rank()];
        const size_t hi = ways.down ? offsets.back() : offsets[sub.rank() + 1];
        divide(buffer + lo * element, hi - lo, ctx.tag.dtype, ctx.size());
      }
      board.finished(is_top ? !ways.down : up, l);
    }
  };
  // A stage's rings up, then down, as far as the ways go.
  auto run_both = [&](size_t l, Interruption* interruption) {
    if (l == top) return run_stage(l, true, interruption);
    if (ways.up) run_stage(l, true, interruption);
    if (ways.down) run_stage(l, false, interruption);
  };

  if (count == 1 || stages == 1) {
    for (size_t l = 0; l < stages && ways.up; ++l) {
      if (l != top) run_stage(l, true, ctx.interruption);
    }
    if (stages == levels) run_stage(top, true, ctx.interruption);
    for (size_t l = std::min(stages, top); l-- > 0;) {
      if (ways.down) run_stage(l, false, ctx.interruption);
    }
    return;
  }

  auto guarded = [&](size_t l, Interruption* interruption) {
    try {
      run_both(l, interruption);
    } catch (const StageBoard::Abandoned&) {
    } catch (const std::exception& e) {
      if (board.fail(std::current_exception())) ctx.transport.abort(e.what());
    }
    board.stage_done();
  };
  std::vector<std::thread> threads;
  try {
    for (size_t l = 1; l < stages; ++l) threads.emplace_back(guarded, l, nullptr);
    guarded(0, ctx.interruption);
    board.await_stages(stages, ctx.deadline, ctx.interruption);  // asking the caller's interruption meanwhile
  } catch (const StageBoard::Abandoned&) {
  } catch (const std::exception& e) {
    if (board.fail(std::current_exception())) ctx.transport.abort(e.what());
  }
  for (std::thread& thread : threads) thread.join();
  if (std::exception_ptr failure = board.failure()) std::rethrow_exception(failure);
}

}  // namespace collectives
