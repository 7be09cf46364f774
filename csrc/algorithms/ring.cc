#include "algorithms/ring.h"

#include <algorithm>
#include <stdexcept>

namespace collectives {

namespace {

// Receives posted ahead of the one being waited on: the transport fills the next segments
// while this thread reduces the current one. Staging memory is this many segments.
constexpr size_t kRecvWindow = 4;

int ring_index(int i, int size) { return ((i % size) + size) % size; }

}  // namespace

std::vector<size_t> even_blocks(size_t count, int blocks) {
  // The first count % blocks blocks hold one element more than the others.
  std::vector<size_t> offsets(blocks + 1);
  size_t base = count / blocks;
  size_t extra = count % blocks;
  for (int b = 0; b <= blocks; ++b) {
    offsets[b] = b * base + std::min<size_t>(b, extra);
  }
  return offsets;
}

void run_ring(const AlgorithmContext& ctx, char* buffer, const std::vector<size_t>& offsets,
              const std::vector<RingStep>& steps) {
  const int size = ctx.size();
  if (size == 1 || steps.empty()) return;
  const int right = ring_index(ctx.rank() + 1, size);
  const int left = ring_index(ctx.rank() - 1, size);
  const size_t element = element_size(ctx.tag.dtype);

  size_t largest = 0;
  for (int b = 0; b < size; ++b) largest = std::max(largest, offsets[b + 1] - offsets[b]);
  if (largest == 0) return;
  const size_t seg = segment_elements(ctx, largest);
  // Message (step s, segment j) is unit s * stride + j: unique, and increasing in the order
  // both neighbours send and receive, which the transport's in-order matching relies on.
  const size_t stride = (largest + seg - 1) / seg;
  auto segments_in = [&](int block) {
    return (offsets[block + 1] - offsets[block] + seg - 1) / seg;
  };
  struct Segment {
    size_t offset;  // in elements from the buffer's start
    size_t length;  // in elements
  };
  auto segment = [&](int block, size_t j) {
    size_t begin = offsets[block] + j * seg;
    return Segment{begin, std::min(seg, offsets[block + 1] - begin)};
  };
  auto unit = [&](size_t step, size_t j) { return static_cast<uint32_t>(step * stride + j); };

  // Every message this rank receives, in arrival order.
  std::vector<std::pair<size_t, size_t>> arrivals;  // (step, segment)
  bool any_reduce = false;
  for (size_t s = 0; s < steps.size(); ++s) {
    for (size_t j = 0; j < segments_in(steps[s].recv_block); ++j) arrivals.emplace_back(s, j);
    any_reduce |= steps[s].reduce;
  }
  if (any_reduce) ctx.scratch.resize(std::max(ctx.scratch.size(), kRecvWindow * seg * element));
  char* staging = ctx.scratch.data();

  std::vector<TransportRequest> sends;
  auto post_send = [&](size_t s, size_t j) {
    Segment part = segment(steps[s].send_block, j);
    sends.push_back(ctx.send(right, ctx.tag.header(unit(s, j), part.length * element),
                                       buffer + part.offset * element));
  };
  std::vector<TransportRequest> window(kRecvWindow);
  auto post_recv = [&](size_t index) {
    auto [s, j] = arrivals[index];
    Segment part = segment(steps[s].recv_block, j);
    // Reduced messages land in staging slot index % window; copied ones go straight home.
    char* target = steps[s].reduce ? staging + (index % kRecvWindow) * seg * element
                                   : buffer + part.offset * element;
    window[index % kRecvWindow] =
        ctx.recv(left, ctx.tag.header(unit(s, j), part.length * element), target);
  };

  for (size_t j = 0; j < segments_in(steps[0].send_block); ++j) post_send(0, j);
  for (size_t i = 0; i < std::min(kRecvWindow, arrivals.size()); ++i) post_recv(i);
  for (size_t i = 0; i < arrivals.size(); ++i) {
    ctx.wait(window[i % kRecvWindow]);
    auto [s, j] = arrivals[i];
    const RingStep& step = steps[s];
    Segment part = segment(step.recv_block, j);
    char* home = buffer + part.offset * element;
    if (step.reduce) {
      reduce_into(home, staging + (i % kRecvWindow) * seg * element, part.length,
                  ctx.tag.dtype, ctx.tag.op);
    }
    if (step.finalize) divide(home, part.length, ctx.tag.dtype, size);
    if (i + kRecvWindow < arrivals.size()) post_recv(i + kRecvWindow);  // the slot is free
    if (ctx.debug && (i + 1 == arrivals.size() || arrivals[i + 1].first != s)) {
      ctx.log("ring step " + std::to_string(s + 1) + "/" + std::to_string(steps.size()) +
              " received block " + std::to_string(step.recv_block) + " from " +
              ctx.peer_name(left));
    }
    // The block just received is the one the next step sends: pass this segment on.
    if (s + 1 < steps.size()) post_send(s + 1, j);
  }
  for (auto& request : sends) ctx.wait(request);
}

void append_reduce_scatter_steps(const AlgorithmContext& ctx, std::vector<RingStep>& steps) {
  // With i this rank's index in the group: step s sends block (i-1-s), receives block (i-2-s)
  // and adds this rank's share. The right neighbour receives block (i+1)-2-s = i-1-s, the
  // one sent. After size-1 steps the last block received, i-2-(size-2) = i (mod size), holds
  // every rank's contribution.
  const int size = ctx.size(), rank = ctx.rank();
  for (int s = 0; s + 1 < size; ++s) {
    bool last = s + 2 == size;
    steps.push_back({ring_index(rank - 1 - s, size), ring_index(rank - 2 - s, size), true,
                     last && ctx.tag.op == ReduceOp::kAvg});
  }
}

void append_allgather_steps(const AlgorithmContext& ctx, std::vector<RingStep>& steps) {
  // Step t: send block (i-t), receive block (i-1-t). Starting from block i, the blocks
  // received, i-1 ... i-(size-1), are all the others.
  const int size = ctx.size(), rank = ctx.rank();
  for (int t = 0; t + 1 < size; ++t) {
    steps.push_back({ring_index(rank - t, size), ring_index(rank - 1 - t, size), false, false});
  }
}

}  // namespace collectives
