#include "algorithms/hierarchical_collectives.h"

#include <cstring>
#include <vector>

#include "algorithms/ring.h"

namespace collectives {
namespace {

/*
 * The working layout. The caller's buffer holds one block of `count` elements per rank, in rank
 * order. Pipelining cuts every block into the same slices, s = even_blocks(count, P), and piece
 * i of the working buffer holds slice i of every rank's block: n * len_i elements from n * s_i
 * on (len_i = s_{i+1} - s_i), in which rank q's slice sits at slot final_block(q):
 *
 *   work[n * s_i + final_block(q) * len_i + e]  <->  user[q * count + s_i + e],  e < len_i.
 *
 * The plan cuts piece i into its levels' blocks exactly as it cuts a buffer of its own (every
 * cut is exact: n * len_i is a multiple of every level's parts in a uniform plan), so the way up
 * leaves rank q with slot final_block(q) of every piece, and the way down starts from it.
 */
struct Layout {
  std::vector<size_t> slices;  // s_0 .. s_P, within a rank's block
  std::vector<size_t> pieces;  // n * s_i: the pieces of the working buffer
};

Layout layout(const AlgorithmContext& ctx, size_t count) {
  const size_t n = ctx.size(), element = element_size(ctx.tag.dtype);
  Layout l;
  l.slices = even_blocks(count, static_cast<int>(std::min(count, Hierarchy::piece_count(n * count * element))));
  for (size_t s : l.slices) l.pieces.push_back(n * s);
  return l;
}

// Copies rank q's slices between the caller's block `user` (its `count` elements) and `work`.
void move_slices(const Layout& l, const Hierarchy& hierarchy, int q, size_t element, char* work, char* user,
                 bool into_work) {
  for (size_t i = 0; i + 1 < l.slices.size(); ++i) {
    const size_t length = l.slices[i + 1] - l.slices[i];
    char* slot = work + (l.pieces[i] + hierarchy.final_block(q) * length) * element;
    char* mine = user + l.slices[i] * element;
    std::memcpy(into_work ? slot : mine, into_work ? mine : slot, length * element);
  }
}

}  // namespace

void allgather_hierarchical(const AlgorithmContext& ctx, Hierarchy& hierarchy, const void* input, void* output,
                            size_t count) {
  const size_t element = element_size(ctx.tag.dtype), bytes = count * element;
  if (count == 0) return;
  const Layout l = layout(ctx, count);
  std::vector<char> work(ctx.size() * bytes);
  move_slices(l, hierarchy, ctx.rank(), element, work.data(), static_cast<char*>(const_cast<void*>(input)), true);
  hierarchy.run(ctx, work.data(), l.pieces, {/*up=*/false, /*down=*/true});
  for (int q = 0; q < ctx.size(); ++q) {
    move_slices(l, hierarchy, q, element, work.data(), static_cast<char*>(output) + q * bytes, false);
  }
}

void reduce_scatter_hierarchical(const AlgorithmContext& ctx, Hierarchy& hierarchy, const void* input, void* output,
                                 size_t count) {
  const size_t element = element_size(ctx.tag.dtype), bytes = count * element;
  if (count == 0) return;
  const Layout l = layout(ctx, count);
  std::vector<char> work(ctx.size() * bytes);
  for (int q = 0; q < ctx.size(); ++q) {
    char* block = static_cast<char*>(const_cast<void*>(input)) + q * bytes;  // only read
    move_slices(l, hierarchy, q, element, work.data(), block, true);
  }
  hierarchy.run(ctx, work.data(), l.pieces, {/*up=*/true, /*down=*/false});
  move_slices(l, hierarchy, ctx.rank(), element, work.data(), static_cast<char*>(output), false);
}

void broadcast_hierarchical(const AlgorithmContext& ctx, const Hierarchy& hierarchy, void* data, size_t count,
                            int root) {
  const std::vector<int> order = hierarchy.chain_from(root);
  std::vector<int> ranks;
  for (int index : order) ranks.push_back(ctx.group.peer(index));
  const Group chain(std::move(ranks), ctx.group.peer(ctx.rank()));
  const AlgorithmContext along{ctx.transport, chain, ctx.tag, ctx.deadline, ctx.segment_bytes,
                               ctx.scratch, ctx.debug, ctx.interruption};
  if (ctx.debug) {
    std::string line = "hierarchical: chain in the tree's order:";
    for (int index : order) line += " " + std::to_string(index);
    ctx.log(line);
  }
  broadcast_chain(along, data, count, 0);
}

}  // namespace collectives
