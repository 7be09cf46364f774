#include "algorithms/algorithm.h"

#include <algorithm>
#include <cstdio>

namespace collectives {

size_t segment_elements(const AlgorithmContext& ctx, size_t largest_message_elems) {
  size_t element = element_size(ctx.tag.dtype);
  size_t bytes = ctx.segment_bytes;
  if (bytes == 0) {
    // Several segments per message keep the pipeline busy; below a floor the per-message
    // overhead dominates, above a ceiling the first and last segments (which cannot overlap
    // anything) cost more. Measured at 64 MiB over 4 loopback ranks (RESULTS.md): 256K
    // segments were the slowest, 512K-4M within the noise of each other.
    constexpr size_t kFloor = 256 << 10, kCeiling = 1 << 20;
    bytes = std::clamp(largest_message_elems * element / 8, kFloor, kCeiling);
  }
  return std::max<size_t>(1, bytes / element);
}

uint32_t post_pieces(const AlgorithmContext& ctx, bool send, int peer, char* data, size_t bytes, uint32_t first_unit,
                     std::vector<TransportRequest>& requests) {
  // An empty message is still one frame: its header is what the receiver checks.
  uint32_t unit = first_unit;
  size_t offset = 0;
  do {
    const size_t piece = std::min(kMaxPieceBytes, bytes - offset);
    const FrameHeader header = ctx.tag.header(unit++, piece);
    requests.push_back(send ? ctx.send(peer, header, data + offset) : ctx.recv(peer, header, data + offset));
    offset += piece;
  } while (offset < bytes);
  return unit;
}

void AlgorithmContext::wait(const TransportRequest& request) const {
  if (!interruption) return transport.wait(request, deadline);
  for (;;) {
    const bool done = transport.wait_until(request, deadline, interruption->next_check());
    stop_if_interrupted();
    if (done) return;
  }
}

void AlgorithmContext::stop_if_interrupted() const {
  if (!interruption || !interruption->interrupted()) return;
  // As for any failure of a wait: no posted buffer is touched once this throws.
  const Interrupted interrupted;
  transport.abort(interrupted.what());
  transport.quiesce();
  throw interrupted;
}

void AlgorithmContext::log(const std::string& phase) const {
  if (debug) note(phase);
}

void AlgorithmContext::note(const std::string& event) const {
  std::fprintf(stderr, "[collectives rank %d] %s: %s\n", rank(), tag.describe().c_str(),
               event.c_str());
}

}  // namespace collectives
