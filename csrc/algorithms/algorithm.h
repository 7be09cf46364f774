// What every collective algorithm gets: the transport, the collective's identity (for frame
// headers and messages), its deadline and its tuning. One function per algorithm file.
#pragma once

#include <cstddef>
#include <vector>

#include "common/error.h"
#include "kernels/reduce.h"
#include "reduction_server/client.h"
#include "transport/frame.h"
#include "transport/tcp_transport.h"

namespace collectives {

struct AlgorithmContext {
  TcpTransport& transport;
  CollectiveTag tag;
  Deadline deadline;
  size_t segment_bytes;  // pipelining granularity; 0 = choose from the message size
  std::vector<char>& scratch;  // staging memory reused across collectives
  bool debug;                  // COLLECTIVES_DEBUG: log each phase on stderr

  int rank() const { return transport.rank(); }
  int size() const { return transport.size(); }
  void wait(const TransportRequest& request) const { transport.wait(request, deadline); }
  // "[collectives rank R] allreduce #7 (sum, 1000 x float32): <phase>", when debugging.
  void log(const std::string& phase) const;
  // The same line, always: for events a user must hear of (a reducer failed).
  void note(const std::string& event) const;
};

// Elements per pipelined message when the largest message of a collective holds
// `largest_message_elems` elements (ctx.segment_bytes, or a size-dependent default).
size_t segment_elements(const AlgorithmContext& ctx, size_t largest_message_elems);

// Pipelined ring (reduce-scatter, then all-gather); in place. count elements of tag.dtype.
void allreduce_ring(const AlgorithmContext& ctx, void* data, size_t count);
// output holds size() * count elements; block r receives rank r's input.
void allgather_ring(const AlgorithmContext& ctx, const void* input, void* output, size_t count);
// input holds size() * count elements; output receives this rank's reduced block of count.
void reduce_scatter_ring(const AlgorithmContext& ctx, const void* input, void* output, size_t count);
// Pipelined chain from root; in place.
void broadcast_chain(const AlgorithmContext& ctx, void* data, size_t count, int root);
// Dissemination barrier: ceil(log2(size)) rounds of empty messages.
void barrier_dissemination(const AlgorithmContext& ctx);
// Element-wise max of `values` over all ranks, in place, by dissemination as the barrier;
// its messages are units first_unit, first_unit + 1, ... of ctx.tag.
void agree_max(const AlgorithmContext& ctx, uint32_t* values, size_t n, uint32_t first_unit);

struct ReductionServerSettings {
  size_t chunk_bytes = 0;  // 0: the default (reduction_server.cc)
  int inflight = 0;        // unanswered chunks per reducer; 0: the default
  double heartbeat_timeout = 10;
  bool fallback_ring = false;  // with every reducer gone, finish on the ring instead of failing
};
int default_inflight(const ReductionServerSettings& settings);

// An all-reduce through the reducers (reduction_server.cc), in two halves, so that the next
// all-reduce's chunks can be on the wire while this one finishes. In place.
struct PostedReduction {
  bool posted = false;
  ShardBatchHandle batch;  // null when there was nothing to send
  size_t chunk_elems = 0;
  std::vector<int> view;    // the reducers the chunks were assigned over
  std::vector<int> agreed;  // after finish: the reducers every worker still uses
};
// Sends the chunks of all-reduce `tag` (count elements at data) to the reducers of `view`,
// which must be the same on every worker.
PostedReduction post_reduction_server(const CollectiveTag& tag, ReducerChannels& reducers,
                                      const ReductionServerSettings& settings,
                                      const std::vector<int>& view, void* data, size_t count);
// Waits for the sums, agrees with the other workers on what is missing anywhere, and
// recovers it; returns once every worker holds every sum, with posted.agreed set.
void finish_reduction_server(const AlgorithmContext& ctx, ReducerChannels& reducers,
                             const ReductionServerSettings& settings, PostedReduction& posted,
                             void* data, size_t count);

}  // namespace collectives
