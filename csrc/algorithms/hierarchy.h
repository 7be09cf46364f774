// A hierarchical plan as one rank runs it (topology-aware multi-layer rings, as Horovod's
// hierarchical all-reduce, Sony's 2D torus and Alibaba PAI's multi-layer rings): reduce-scatters
// up the levels (the host's over shared memory, then one ring per local rank across hosts, the
// same across racks and above), the top's rings, all-gathers back down; with the levels
// pipelined. The plan is data made by the Python planner (collectives/hierarchical/) from the
// ranks' topology labels; the collectives that take it (allreduce_hierarchical.h,
// hierarchical_collectives.h) only say which way data moves through it.
//
// The plan. Level 0 is the host, then every COLLECTIVES_TOPOLOGY level above it, lowest first;
// the last level is the top. A level is its groups: lists of communicator indices, each in ring
// order, pairwise disjoint. Level 0's groups hold every rank (one group per host). A group's
// first `parts` members are its carriers, `parts` being the fewest members of any group of the
// level (the top level's groups are all of one size, and all carry):
//
//   * Reduce-scatter (levels below the top): the group cuts the range it was handed into
//     `parts` near-equal blocks (ring.h's even_blocks) and gives member m < parts block m
//     reduced over the whole group; members from `parts` on own empty blocks: they add their
//     data into the carriers' blocks on the way around the ring and carry nothing up.
//   * A carrier of level l takes its block to level l + 1, where it is in exactly one group;
//     every member of that group holds the same range (the same position in each group below),
//     so the blocks line up. A rank that does not carry is in no group above.
//   * The top level's groups all-reduce their range (a ring). Then every level below
//     all-gathers the blocks it cut, top down.
//
// So uneven layouts work: with 3 ranks on one host and 2 on another, parts is 2 at the host
// level, the third rank of the first host reduces into the others' blocks and sends nothing
// across hosts; likewise racks of different host counts at the rack level.
//
// Pipelining. The buffer is cut into pieces (pieces(): up to kMaxPieces of at least
// kMinPieceBytes), and each piece goes through the plan as a buffer of its own would. Each level
// this rank takes part in is a stage with a thread of its own, which runs its rings piece after
// piece: the top's ring of piece i runs while the host's reduce-scatter works on piece i + 1 and
// the all-gathers bring piece i - 1 down; so the slowest level's links (a rack's uplink, say)
// set the pace, and the other levels' time hides behind them.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"
#include "algorithms/select.h"

namespace collectives {

struct HierarchyLevel {
  std::string name;                      // "host", "rack", ...: for logs
  std::vector<std::vector<int>> groups;  // communicator indices, each group in ring order
  CostModel cost;                        // a message over this level's links (select.cc)
};

struct HierarchyPlan {
  std::vector<HierarchyLevel> levels;  // lowest first; empty: no hierarchical algorithm
  std::string description;             // "hierarchical(4 ranks/host x 2 hosts)"
};

// Which way data goes through the plan: an all-reduce goes up (the reduce-scatters, then the
// top's reduce-scatter) and down (the top's all-gather, then the all-gathers); a reduce-scatter
// only up, an all-gather only down.
struct HierarchyWays {
  bool up;
  bool down;
};

class Hierarchy {
 public:
  // What the cost model needs of a level; the same on every rank.
  struct LevelShape {
    int parts;    // blocks each group cuts its range into (the top level: its group size)
    int largest;  // members of the largest group (the rings' steps on the critical path)
    CostModel cost;
  };
  static constexpr size_t kMinPieceBytes = size_t{1} << 20;
  static constexpr size_t kMaxPieces = 16;

  // `group`: the communicator's. std::invalid_argument where the plan breaks the rules above.
  Hierarchy(const HierarchyPlan& plan, const Group& group);

  const std::string& description() const { return description_; }
  const std::vector<LevelShape>& shape() const { return shape_; }
  // Whether every group of a level has as many members as every other (so every rank carries
  // up to the top, and each ends the way up with one of size() equal blocks).
  bool uniform() const { return uniform_; }
  // In a uniform plan: which of the size() equal blocks of a range member `index` of the
  // communicator ends the way up with.
  int final_block(int index) const { return final_block_[index]; }
  // The communicator's indices in a chain from `root` that enters every node of the tree (a
  // host, a rack, ...) once: `root`, the rest of its host, the rest of its rack, ... (each node's
  // ranks in the tree's order).
  std::vector<int> chain_from(int root) const;

  // How many pieces a collective of `bytes` is pipelined over: bytes / kMinPieceBytes, at least
  // 1 and at most kMaxPieces.
  static size_t piece_count(size_t bytes);
  // Element offsets of the pieces of `count` elements of `element_bytes`: piece_count(count *
  // element_bytes) near-equal pieces (even_blocks).
  static std::vector<size_t> pieces(size_t count, size_t element_bytes);
  // Runs the plan's `ways` over each piece [pieces[i], pieces[i + 1]) of `buffer` (of
  // ctx.tag.dtype), the stages pipelined. Op avg divides once, at the top, by ctx.size().
  void run(const AlgorithmContext& ctx, char* buffer, const std::vector<size_t>& pieces, HierarchyWays ways);

 private:
  std::vector<LevelShape> shape_;
  std::vector<Group> mine_;  // this rank's group at each level it takes part in (global ranks)
  std::vector<std::string> names_;
  std::vector<int> final_block_;
  std::vector<int> tree_order_;                // every index, each node of the tree contiguous
  std::vector<std::vector<int>> node_of_;     // node_of_[l][index]: its node after level l (the node's head)
  bool uniform_ = true;
  std::string description_;
  std::vector<std::vector<char>> scratch_;  // each stage's staging memory, kept between runs
};

}  // namespace collectives
