// All-gather, reduce-scatter and broadcast over a hierarchical plan (hierarchy.h); chosen per
// call in select.h, beside the flat ring and chain (algorithm.h).
//
// All-gather and reduce-scatter need a uniform plan (every group of a level as large as every
// other: Hierarchy::uniform), in which the way up leaves member q with one of size() equal
// blocks, final_block(q). They run the plan on a working copy laid out so that this block is
// rank q's (hierarchical_collectives.cc): the reduce-scatter goes up (each level's
// reduce-scatter, the top's; no all-gather), the all-gather down (the top's all-gather, each
// level's). So a host's NIC carries (h-1)/h of the total once each way for h hosts, where the
// flat ring carries (n-1)/n of it over n ranks; racks likewise over their uplinks. Reduction
// order: each element is summed as the plan's rings sum the block it falls in (hierarchy.h),
// whatever the pieces: an element's block at every level is fixed by the rank it belongs to.
//
// The broadcast is a pipelined chain (broadcast_chain) in the tree's order from the root
// (Hierarchy::chain_from): it enters every host and every rack once, where a chain in rank
// order crosses a host's NIC at every hop that leaves the host.
#pragma once

#include <cstddef>

#include "algorithms/algorithm.h"
#include "algorithms/hierarchy.h"

namespace collectives {

// As allgather_ring: output holds size() * count elements; block r receives rank r's input.
void allgather_hierarchical(const AlgorithmContext& ctx, Hierarchy& hierarchy, const void* input, void* output,
                            size_t count);
// As reduce_scatter_ring: input holds size() * count elements; output this rank's reduced block.
void reduce_scatter_hierarchical(const AlgorithmContext& ctx, Hierarchy& hierarchy, const void* input, void* output,
                                 size_t count);
// As broadcast_chain, from communicator index `root`; in place.
void broadcast_hierarchical(const AlgorithmContext& ctx, const Hierarchy& hierarchy, void* data, size_t count,
                            int root);

}  // namespace collectives
