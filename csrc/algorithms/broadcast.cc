#include <algorithm>

#include "algorithms/algorithm.h"

namespace collectives {

void broadcast_chain(const AlgorithmContext& ctx, void* data, size_t count, int root) {
  const int size = ctx.size();
  if (count == 0 || size == 1) return;
  // Group indices form a chain root, root+1, ..., root-1; position 0 only sends, the last
  // only receives, the rest pass each segment on as soon as it has arrived.
  const int position = ((ctx.rank() - root) % size + size) % size;
  const int next = (ctx.rank() + 1) % size;
  const int previous = (ctx.rank() - 1 + size) % size;
  const size_t element = element_size(ctx.tag.dtype);
  const size_t seg = segment_elements(ctx, count);
  const size_t segments = (count + seg - 1) / seg;
  char* bytes = static_cast<char*>(data);
  auto length = [&](size_t j) { return std::min(seg, count - j * seg); };
  auto header = [&](size_t j) {
    return ctx.tag.header(static_cast<uint32_t>(j), length(j) * element);
  };

  std::vector<TransportRequest> sends;
  if (position == 0) {
    for (size_t j = 0; j < segments; ++j) {
      sends.push_back(ctx.send(next, header(j), bytes + j * seg * element));
    }
  } else {
    constexpr size_t kWindow = 4;  // receives posted ahead, as in the ring
    std::vector<TransportRequest> window(kWindow);
    auto post_recv = [&](size_t j) {
      window[j % kWindow] = ctx.recv(previous, header(j), bytes + j * seg * element);
    };
    for (size_t j = 0; j < std::min(kWindow, segments); ++j) post_recv(j);
    for (size_t j = 0; j < segments; ++j) {
      ctx.wait(window[j % kWindow]);
      if (j + kWindow < segments) post_recv(j + kWindow);
      if (position + 1 < size) {
        sends.push_back(ctx.send(next, header(j), bytes + j * seg * element));
      }
    }
  }
  for (auto& request : sends) ctx.wait(request);
}

}  // namespace collectives
