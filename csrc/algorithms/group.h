// The ranks a collective runs over, in order: algorithms number their peers 0..size()-1 in
// this list (a ring's neighbours are index ± 1, not rank ± 1), and the transport is addressed
// by the global rank behind an index. The world group is every rank in order; a split
// communicator's group is a subset over the same transport, which is why a group is no more
// than a list of ranks.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace collectives {

class Group {
 public:
  // `ranks`: global ranks, each once, in the group's order; `self` must be one of them.
  Group(std::vector<int> ranks, int self) : ranks_(std::move(ranks)) {
    auto it = std::find(ranks_.begin(), ranks_.end(), self);
    if (it == ranks_.end()) {
      throw std::invalid_argument("rank " + std::to_string(self) + " is not in its own group");
    }
    index_ = static_cast<int>(it - ranks_.begin());
  }
  static Group world(int size, int rank) {
    std::vector<int> ranks(size);
    for (int r = 0; r < size; ++r) ranks[r] = r;
    return Group(std::move(ranks), rank);
  }

  int index() const { return index_; }  // this rank's place in the group
  int size() const { return static_cast<int>(ranks_.size()); }
  int peer(int index) const { return ranks_[index]; }  // the global rank at `index`

 private:
  std::vector<int> ranks_;
  int index_ = 0;
};

}  // namespace collectives
