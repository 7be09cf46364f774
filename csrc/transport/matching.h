// How a transport matches a peer's frames with receives when several communicators share it
// (FrameHeader::comm): in posting order within each communicator. A frame whose communicator
// has no receive posted while another communicator's receive waits on the same link is read
// ahead into memory (stashed), since ranks may run different communicators' collectives in
// different orders; with no receive posted at all it is left where it is (parked), so that a
// fast sender is held back. Shared by TcpTransport and ShmTransport.
//
// Receives from any source (Transport::recv_any, as MPI_ANY_SOURCE and Gloo's recv from a list
// of ranks) wait in one ReceiveMatching, which every link to their ranks consults, the links of
// both parts of a routing transport alike: the first frame of the receive's lane that arrives
// from any of its ranks claims it (under ReceiveMatching's lock, so no other link can), unless a
// receive posted earlier for that sender takes the frame first. A pending one counts as a receive
// waiting on each of its ranks' links, so frames of other lanes are read ahead rather than parked
// in front of the one it waits for.
//
// Point-to-point frames (CollectiveKind::kSendRecv) are numbered by their sender per (receiver,
// lane), and checked here as they are matched: with receives from any source the receiver cannot
// know at posting which number a receive will take. Every other frame carries its collective's
// number, which the receive expects from the start.
//
// FrameHeader is packed, so a communicator id used as a map key is copied out first
// (uint64_t{h.comm}): a reference bound to a packed field may be misaligned.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "transport/frame.h"

namespace collectives {

struct PostedOperation;
using PostedOperationPtr = std::shared_ptr<PostedOperation>;

struct StashedFrame {
  FrameHeader header;
  std::vector<char> payload;
};

/*
 * The receives from any source of one transport (a routing transport's: both parts share it),
 * and the numbers of point-to-point frames matched so far. Its lock is taken after a
 * transport's own, never before: it calls nothing outside.
 */
class ReceiveMatching {
 public:
  // The next place in posting order, for every receive (per-peer ones too).
  uint64_t next_order() { return order_.fetch_add(1) + 1; }

  // Takes a receive from any source: it waits until a frame claims it. False (and it is done,
  // not ok) if the transport failed already, or (*all_gone) every one of its ranks has gone.
  bool post(const PostedOperationPtr& op, bool* all_gone);

  // The receive that takes the next frame of lane `comm` from `peer`: the first of `mine` (the
  // receives posted for that peer and lane) or the oldest pending receive from any source that
  // `peer` may complete, whichever was posted first; taken from where it waited, and numbered
  // (number()). Null if neither is there.
  PostedOperationPtr take(int peer, uint64_t comm, std::deque<PostedOperationPtr>& mine);
  // Claims `op` for a frame of `peer` that waits already (recv_any's look at the links); false
  // if another frame claimed it first, or it failed.
  bool claim(PostedOperation& op, int peer);
  // A frame is matched with `expected`'s receive: a point-to-point one gets the number that the
  // next frame of its lane from `peer` must carry.
  void number(int peer, FrameHeader& expected);
  // Whether a receive from any source that `peer` may complete waits.
  bool awaits(int peer);
  // A rank that a pending receive from any source waits on; -1 if none does.
  int awaited_rank();

  // `op` is finished, well or not: a receive from any source under this lock (its waiters wake),
  // any other under its transport's, which the caller holds (and whose waiters it wakes).
  void finish(PostedOperation& op, bool ok);
  // The transport failed: every pending receive from any source ends, not ok, and its waiters
  // (and those of claimed ones) wake. Idempotent.
  void fail();
  // `peer` closed its communicator, its last frame read: a pending receive from any source whose
  // ranks have all gone can never complete. Returns such a receive's ranks, or none.
  std::vector<int> gone(int peer);

 private:
  friend class Transport;  // waits on mutex_ and changed_ (Transport::wait_any_until)
  void number_locked(int peer, FrameHeader& expected);
  bool all_gone_locked(const PostedOperation& op) const;

  std::atomic<uint64_t> order_{0};
  // pending_.size(), read without the lock: a frame while none waits (every collective's) costs
  // no lock. One posted meanwhile on another thread is one posted after the frame was matched.
  std::atomic<size_t> pending_count_{0};
  std::mutex mutex_;
  std::condition_variable changed_;  // a receive from any source finished, or the transport failed
  std::deque<PostedOperationPtr> pending_;  // in posting order
  std::map<std::pair<int, uint64_t>, uint64_t> numbers_;  // (peer, lane): the next frame's number
  std::vector<int> gone_;
  bool failed_ = false;
};

// Whether receives are posted on a link, for any communicator.
template <typename ReceivesByCommunicator>
bool any_waiting(const ReceivesByCommunicator& recvs) {
  return std::any_of(recvs.begin(), recvs.end(), [](const auto& entry) { return !entry.second.empty(); });
}

// Where the frame with header `h` from `peer` goes, given the receives and stashed frames of its
// link: into the receive returned (taken from where it waited), else read ahead into memory of
// its own (*read_ahead), else nowhere yet (parked).
template <typename ReceivesByCommunicator>
PostedOperationPtr place_frame(const FrameHeader& h, int peer, ReceivesByCommunicator& recvs,
                               std::map<uint64_t, std::deque<StashedFrame>>& stashed, ReceiveMatching& matching,
                               bool* read_ahead) {
  *read_ahead = false;
  if (!stashed[uint64_t{h.comm}].empty()) {  // behind frames of its lane read ahead, in order
    *read_ahead = true;
    return nullptr;
  }
  PostedOperationPtr op = matching.take(peer, uint64_t{h.comm}, recvs[uint64_t{h.comm}]);
  if (!op) *read_ahead = any_waiting(recvs) || matching.awaits(peer);
  return op;
}

// A frame read ahead waits in memory for its receive, and its size comes from a header that is
// not yet authenticated (the tag follows the payload): it is bounded. A collective's messages
// are segments of a few MiB, or a small buffer whole (recursive doubling).
constexpr uint64_t kMaxReadAheadBytes = uint64_t{256} << 20;

// Memory for a frame read ahead from `who`; empty, with why in *refused, if it cannot have it.
std::vector<char> read_ahead_buffer(const std::string& who, const FrameHeader& h, std::string* refused);

// Fills receive `op` from the first frame stashed for its communicator, which it takes: empty,
// or why the frame is not the one expected (nothing is copied then). `op` was taken for a frame
// of `peer` (ReceiveMatching::take or claim), and numbered.
std::string take_stashed(std::deque<StashedFrame>& stash, PostedOperation& op);

}  // namespace collectives
