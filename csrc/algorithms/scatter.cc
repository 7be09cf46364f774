#include <cstring>

#include "algorithms/algorithm.h"

namespace collectives {

void scatter_linear(const AlgorithmContext& ctx, const void* input, void* output, size_t count, int root) {
  agree_on_call(ctx);
  const size_t bytes = count * element_size(ctx.tag.dtype);
  std::vector<TransportRequest> requests;
  if (ctx.rank() != root) {
    post_pieces(ctx, /*send=*/false, root, static_cast<char*>(output), bytes, 0, requests);
  } else {
    // Block r of the root's input (r * bytes in) goes to index r; its own is copied.
    const char* in = static_cast<const char*>(input);
    for (int r = 0; r < ctx.size(); ++r) {
      if (r != root) post_pieces(ctx, /*send=*/true, r, const_cast<char*>(in + r * bytes), bytes, 0, requests);
    }
    if (bytes > 0 && in + root * bytes != output) std::memmove(output, in + root * bytes, bytes);
  }
  for (auto& request : requests) ctx.wait(request);
}

}  // namespace collectives
