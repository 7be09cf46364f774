#include <cstring>

#include "algorithms/algorithm.h"

namespace collectives {

void alltoall_pairwise(const AlgorithmContext& ctx, const void* input, const std::vector<size_t>& send_counts,
                       void* output, const std::vector<size_t>& recv_counts) {
  const int size = ctx.size(), rank = ctx.rank();
  const size_t element = element_size(ctx.tag.dtype);
  // Messages are packed in index order: index j's starts after the counts of 0..j-1.
  std::vector<size_t> send_at(size + 1, 0), recv_at(size + 1, 0);
  for (int j = 0; j < size; ++j) {
    send_at[j + 1] = send_at[j] + send_counts[j];
    recv_at[j + 1] = recv_at[j] + recv_counts[j];
  }
  const char* in = static_cast<const char*>(input);
  char* out = static_cast<char*>(output);
  if (recv_counts[rank] != send_counts[rank]) {
    throw std::invalid_argument("alltoall: this rank sends itself " + std::to_string(send_counts[rank]) +
                                " elements but expects " + std::to_string(recv_counts[rank]));
  }
  if (send_counts[rank] > 0) std::memmove(out + recv_at[rank] * element, in + send_at[rank] * element,
                                          send_counts[rank] * element);
  /*
   * Step s = 1..size-1 pairs index i with i+s (it sends there) and i-s (it receives from
   * there), so that in every step each rank sends one message and receives one, and no rank
   * is everyone's first target. Everything is posted at once (the transport keeps each link's
   * messages in order); the header of each pair's message carries that pair's element count,
   * so a receiver that expects another count refuses it before a byte lands, and aborts.
   */
  std::vector<TransportRequest> requests;
  for (int s = 1; s < size; ++s) {
    const int to = (rank + s) % size, from = (rank - s + size) % size;
    AlgorithmContext pair = ctx;
    pair.tag.count = recv_counts[from];
    post_pieces(pair, /*send=*/false, from, out + recv_at[from] * element, recv_counts[from] * element, 0, requests);
    pair.tag.count = send_counts[to];
    post_pieces(pair, /*send=*/true, to, const_cast<char*>(in + send_at[to] * element), send_counts[to] * element, 0,
                requests);
  }
  for (auto& request : requests) ctx.wait(request);
}

}  // namespace collectives
