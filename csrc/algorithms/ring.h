// The pipelined ring shared by allreduce, allgather and reduce_scatter.
//
// The buffer is cut into size() blocks. In each step of a ring phase every rank sends one
// block to its right neighbour (the next index in the group) and receives one from its left; a block is cut into segments,
// and segment j of step s+1 leaves as soon as segment j of step s has arrived (and been
// reduced), so transfer and reduction of consecutive segments overlap.
#pragma once

#include <cstddef>
#include <vector>

#include "algorithms/algorithm.h"

namespace collectives {

struct RingStep {
  int send_block;
  int recv_block;
  bool reduce;    // reduce the received block into the buffer (else it overwrites it)
  bool finalize;  // after this step's reduction, divide the received block (op avg)
};

// Element offsets of `blocks` near-equal blocks over `count` elements: block b spans
// [offsets[b], offsets[b+1]).
std::vector<size_t> even_blocks(size_t count, int blocks);

// Runs `steps` over `buffer`. Each step's send block must be the block received in the
// step before (step 0 sends what the buffer holds), which is what lets segments pipeline
// from one step into the next.
void run_ring(const AlgorithmContext& ctx, char* buffer, const std::vector<size_t>& offsets,
              const std::vector<RingStep>& steps);

// The reduce-scatter phase: afterwards block ctx.rank() (this rank's index) holds the reduction over all ranks.
void append_reduce_scatter_steps(const AlgorithmContext& ctx, std::vector<RingStep>& steps);
// The all-gather phase: starting from block ctx.rank() complete, every block ends complete.
void append_allgather_steps(const AlgorithmContext& ctx, std::vector<RingStep>& steps);

}  // namespace collectives
