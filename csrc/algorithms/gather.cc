#include <cstring>

#include "algorithms/algorithm.h"

namespace collectives {

void gather_linear(const AlgorithmContext& ctx, const void* input, void* output, size_t count, int root) {
  agree_on_call(ctx);
  const size_t bytes = count * element_size(ctx.tag.dtype);
  std::vector<TransportRequest> requests;
  if (ctx.rank() != root) {
    // Everyone else sends its block to the root as one message (in pieces of at most
    // kMaxPieceBytes), and is done once the root has it.
    post_pieces(ctx, /*send=*/true, root, static_cast<char*>(const_cast<void*>(input)), bytes, 0, requests);
  } else {
    // The root posts a receive per peer straight into block r of its output: index r's block
    // starts r * bytes in. The peers' messages arrive in any order; each link keeps its own.
    char* out = static_cast<char*>(output);
    if (bytes > 0 && out + root * bytes != input) std::memmove(out + root * bytes, input, bytes);
    for (int r = 0; r < ctx.size(); ++r) {
      if (r != root) post_pieces(ctx, /*send=*/false, r, out + r * bytes, bytes, 0, requests);
    }
  }
  for (auto& request : requests) ctx.wait(request);
}

}  // namespace collectives
