// The hierarchical (multi-layer ring) all-reduce, as Horovod's hierarchical all-reduce, Sony's 2D
// torus and Alibaba PAI's multi-layer rings: reduce-scatter inside each host (over shared
// memory), then parallel rings across hosts on 1/k of the buffer each, the same again across
// racks and every level above, an all-reduce at the top on what is left, and all-gathers back
// down. The plan is data made by the Python planner (collectives/hierarchical/) from the ranks'
// topology labels; this file only runs it.
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
//   * The top level's groups all-reduce their range (a ring); op avg divides there, once, by the
//     communicator's size. Then every level below all-gathers the blocks it cut, top down.
//
// So uneven layouts work: with 3 ranks on one host and 2 on another, parts is 2 at the host
// level, the third rank of the first host reduces into the others' blocks and sends nothing
// across hosts; likewise racks of different host counts at the rack level.
#pragma once

#include <string>
#include <vector>

#include "algorithms/allreduce.h"
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

class HierarchicalAllreduce : public DirectAllreduce {
 public:
  // What the cost model needs of a level; the same on every rank.
  struct LevelShape {
    int parts;    // blocks each group cuts its range into (the top level: its group size)
    int largest;  // members of the largest group (the rings' steps on the critical path)
    CostModel cost;
  };

  // `group`: the communicator's. std::invalid_argument where the plan breaks the rules above.
  HierarchicalAllreduce(const HierarchyPlan& plan, const Group& group);

  const char* name() const override { return description_.c_str(); }
  void run(const AlgorithmContext& ctx, void* data, size_t count) override;
  const std::vector<LevelShape>& shape() const { return shape_; }

 private:
  std::vector<LevelShape> shape_;
  std::vector<Group> mine_;  // this rank's group at each level it takes part in (global ranks)
  std::vector<std::string> names_;
  std::string description_;
};

}  // namespace collectives
