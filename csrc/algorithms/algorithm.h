// What every collective algorithm gets: the transport and the group it runs over, the
// collective's identity (for frame headers and messages), its deadline and its tuning. Peers
// are indices in the group: send(i) reaches the rank at group index i. One function or
// object per algorithm file.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "algorithms/group.h"
#include "common/error.h"
#include "kernels/reduce.h"
#include "transport/frame.h"
#include "transport/transport.h"

namespace collectives {

// Offered by a caller whose own thread runs a collective (Communicator): asked whether to give
// up every kInterruptionCheck while the collective waits or moves data (between two waits, so a
// long run of short ones is no exception); true ends the collective, and the communicator as
// any failure does, with Interrupted.
constexpr auto kInterruptionCheck = std::chrono::milliseconds(100);

class Interruption {
 public:
  explicit Interruption(std::function<bool()> ask) : ask_(std::move(ask)) {}
  // Until when a wait may go on without asking.
  Clock::time_point next_check() const { return next_check_; }
  // Whether the caller wants the collective ended; asks it only once the check is due.
  bool interrupted() {
    const Clock::time_point now = Clock::now();
    if (now < next_check_) return false;
    next_check_ = now + kInterruptionCheck;
    return ask_();
  }

 private:
  std::function<bool()> ask_;
  Clock::time_point next_check_ = Clock::now() + kInterruptionCheck;
};

class Interrupted : public CollectiveError {
 public:
  Interrupted() : CollectiveError("interrupted (a signal reached the rank's waiting thread, e.g. Ctrl-C)") {}
};

struct AlgorithmContext {
  Transport& transport;
  const Group& group;
  CollectiveTag tag;
  Deadline deadline;
  size_t segment_bytes;  // pipelining granularity; 0 = choose from the message size
  std::vector<char>& scratch;  // staging memory reused across collectives
  bool debug;                  // COLLECTIVES_DEBUG: log each phase on stderr
  Interruption* interruption = nullptr;  // the caller's, where its thread runs the collective

  int rank() const { return group.index(); }
  int size() const { return group.size(); }
  TransportRequest send(int index, const FrameHeader& header, const void* data) const {
    return transport.send(group.peer(index), header, data);
  }
  TransportRequest recv(int index, const FrameHeader& expected, void* data) const {
    return transport.recv(group.peer(index), expected, data);
  }
  const std::string& peer_name(int index) const { return transport.peer_name(group.peer(index)); }
  void wait(const TransportRequest& request) const;
  // Where the caller's interruption asks to give up (once its check is due): aborts the
  // transport and throws Interrupted.
  void stop_if_interrupted() const;
  // "[collectives rank R] allreduce #7 (sum, 1000 x float32): <phase>", when debugging.
  void log(const std::string& phase) const;
  // The same line, always: for events a user must hear of (a reducer failed).
  void note(const std::string& event) const;
};

// Elements per pipelined message when the largest message of a collective holds
// `largest_message_elems` elements (ctx.segment_bytes, or a size-dependent default).
size_t segment_elements(const AlgorithmContext& ctx, size_t largest_message_elems);

// output holds size() * count elements; block r receives rank r's input.
void allgather_ring(const AlgorithmContext& ctx, const void* input, void* output, size_t count);
// input holds size() * count elements; output receives this rank's reduced block of count.
void reduce_scatter_ring(const AlgorithmContext& ctx, const void* input, void* output, size_t count);
// Pipelined chain from group index root; in place.
void broadcast_chain(const AlgorithmContext& ctx, void* data, size_t count, int root);
// Dissemination barrier: ceil(log2(size)) rounds of empty messages.
void barrier_dissemination(const AlgorithmContext& ctx);
// Every rank's call is this rank's (ctx.tag: kind, count, dtype, op, root), or every rank fails:
// one empty message to the next index and one from the previous, whose headers are checked.
// Any disagreement among the ranks shows between some pair of neighbours, and the rank that
// finds it aborts the transport, so that all of them hear of it (rather than wait on a root
// that will never send). Rooted collectives (reduce, gather, scatter) start with it.
void agree_on_call(const AlgorithmContext& ctx);
// Ring reduce-scatter, then each rank's reduced block to group index root; `data` (count
// elements) is in place on the root and left as it was elsewhere.
void reduce_to_root(const AlgorithmContext& ctx, void* data, size_t count, int root);
// Root's output (size() * count elements) receives block r from group index r; output is
// unused elsewhere.
void gather_linear(const AlgorithmContext& ctx, const void* input, void* output, size_t count, int root);
// Block r of root's input (size() * count elements) goes to group index r's output; input is
// unused elsewhere.
void scatter_linear(const AlgorithmContext& ctx, const void* input, void* output, size_t count, int root);
// Rank r sends send_counts[j] elements (packed in input, in order of j) to index j, and
// receives recv_counts[j] elements from j (packed in output, in order of j).
void alltoall_pairwise(const AlgorithmContext& ctx, const void* input, const std::vector<size_t>& send_counts,
                       void* output, const std::vector<size_t>& recv_counts);

// Posts one message of `bytes` bytes to (send) or from (recv) group index `peer` as frames of
// at most kMaxPieceBytes, units first_unit, first_unit + 1, ... of ctx.tag (whose count is the
// message's element count); appends the requests. Returns the next free unit.
constexpr size_t kMaxPieceBytes = size_t{16} << 20;
uint32_t post_pieces(const AlgorithmContext& ctx, bool send, int peer, char* data, size_t bytes, uint32_t first_unit,
                     std::vector<TransportRequest>& requests);
// Units for messages that are not data: above any schedule's.
constexpr uint32_t kAgreementUnit = 0xFFFFFF00u;

// Element-wise max of `values` over all ranks, in place, by dissemination as the barrier;
// its messages are units first_unit, first_unit + 1, ... of ctx.tag.
void agree_max(const AlgorithmContext& ctx, uint32_t* values, size_t n, uint32_t first_unit);

}  // namespace collectives
