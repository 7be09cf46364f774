// What algorithms and the communicator see of the network, as Gloo's Pair/UnboundBuffer: tagged
// messages to and from a peer rank, a wait with a deadline, and one sticky failure that every
// peer hears of. Peers are global ranks (0..size-1 of the job's workers); algorithms reach them
// through a Group (algorithms/group.h). Implementations: TcpTransport, ShmTransport (ranks of
// one host), RoutingTransport (each peer over one of those two); an in-memory fake in the C++
// tests.
//
// Every implementation keeps the same contract:
//   - matching: the n-th receive posted for a peer takes the n-th message that peer sent to
//     this rank on the same lane (TcpTransport: connection header.unit % connections), and its
//     header must be the one expected, checked before a payload byte reaches `data`; a receive
//     from any source (recv_any) takes part in every one of its ranks' matching, in posting
//     order (ReceiveMatching, matching.h);
//   - failure: the first failure (a peer's abort or death, a header that disagrees, abort())
//     fails every pending and later request, and every peer is told why;
//   - deadlines: a wait that reaches its deadline aborts the transport and throws TimeoutError,
//     naming the rank that stopped rather than a healthy rank that waits on it too
//     (why_receive_timed_out), and every rank answers another's question of what it waits for.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "transport/frame.h"
#include "transport/matching.h"

namespace collectives {

// What every transport says of a peer that is gone, so that errors read alike whatever carried
// the link: it died (its end closed without a goodbye), or it closed its communicator before
// this rank was done with it (at once, or in the middle of an exchange).
std::string peer_exited(const std::string& peer);
std::string peer_has_closed(const std::string& peer);
std::string peer_closed_mid_exchange(const std::string& peer);

// A posted send or receive. Implementations keep their own progress state behind it; a request
// is only ever waited on by the transport that made it.
struct TransportOperation {
  virtual ~TransportOperation() = default;
  // The rank it goes to or comes from; for a receive from any source (recv_any), kAnySource
  // until a message claims it, then the rank that sent it (set once, before it is done).
  int peer = 0;
  bool is_send = false;
  FrameHeader header;  // the header to send, or the one expected
  // recv_any: the ranks whose message may complete it (set once, at posting); empty otherwise.
  std::vector<int> sources;
  bool from_any_source() const { return !sources.empty(); }
};
constexpr int kAnySource = -1;
using TransportRequest = std::shared_ptr<TransportOperation>;

// What TcpTransport and ShmTransport keep of a request they posted.
struct PostedOperation : TransportOperation {
  char* data = nullptr;  // payload (header.nbytes bytes)
  std::string owned;     // the payload, where the transport sends it on its own (notices)
  // Guarded by the transport's mutex, or for a receive from any source by its
  // ReceiveMatching's (which every transport that may complete it shares):
  bool done = false;     // finished, well or not
  bool ok = false;       // every byte moved
  uint64_t order = 0;    // a receive's place in posting order (ReceiveMatching::next_order)

  // A notice to `peer` (Transport::notify), its text (cut to kMaxAbortReason) owned as payload.
  static std::shared_ptr<PostedOperation> notice(int peer, uint32_t about, const std::string& text);
};

// News from a peer that does not stop the job (a kNotice frame).
struct PeerNotice {
  int from;
  uint32_t about;
  std::string text;
};

// Why a transport failed (Transport::failure); an empty reason while it has not.
struct TransportFailure {
  std::string reason;
  bool timed_out = false;  // a deadline, this rank's or a peer's

  bool empty() const { return reason.empty(); }
  // TimeoutError for a deadline, else CollectiveError, with the reason: as a wait would throw.
  [[noreturn]] void raise() const {
    if (timed_out) throw TimeoutError(reason);
    throw CollectiveError(reason);
  }
};

// Where a chain of waiting ranks ends (Transport::trace_stall).
struct StalledPeer {
  enum class Why { kSilent, kWaitsForNobody, kWaitsOnAsker, kWaitsInCircle };
  int rank;
  Why why;
  int through;  // ranks between the one asked first and it, each waiting on the next
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& peer_name(int peer) const = 0;

  // `data` (header.nbytes bytes) must stay valid until the request is done.
  virtual TransportRequest send(int peer, const FrameHeader& header, const void* data) = 0;
  virtual TransportRequest recv(int peer, const FrameHeader& expected, void* data) = 0;
  /*
   * Receives the first message of lane expected.comm that any rank of `sources` (other ranks,
   * each once) sends, as MPI_ANY_SOURCE: a message is matched with it as with a receive posted
   * for its sender (a rank's n-th message of a lane goes to the n-th receive, for that rank or
   * from any source, that may take it, in posting order), its header checked before a byte
   * lands, and it is then no other receive's. Once done, the request's `peer` is the sender.
   * std::invalid_argument where the transport cannot (receives_from_any_source()).
   */
  TransportRequest recv_any(std::vector<int> sources, const FrameHeader& expected, void* data);
  virtual bool receives_from_any_source() const { return false; }
  // recv_any, for implementations and a routing transport's parts: `op` (pending in matching())
  // claims a frame of one of its sources that arrived before it and waits (read ahead, or parked).
  virtual void offer_waiting_frames(const std::shared_ptr<PostedOperation>& /*op*/) {}

  // Blocks until the request is done. Throws CollectiveError if the transport failed, and
  // TimeoutError at the deadline (after aborting the transport, so peers learn of it). Once it
  // throws, the transport touches no posted buffer again.
  void wait(const TransportRequest& request, Deadline deadline) { wait_until(request, deadline, deadline); }
  // The same, except that it returns false, with nothing changed, once `until` passes while
  // the request is not done yet (and the deadline is still ahead): for a waiter with something
  // else to look after between waits (a caller's thread that must notice Ctrl-C).
  virtual bool wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) = 0;

  /*
   * Who holds this rank up. A receive that times out may wait on a peer that is itself
   * waiting for a third rank (a ring waits on its neighbour, which waits on the next, which
   * waits on the rank that stopped): naming that peer would blame a healthy rank. So each of
   * `peers` is asked which rank it waits to receive from (ask_waiting_on), and one that waits
   * on another is followed to it. A chain ends at a rank that waits for no rank, that does
   * not answer, or that leads back into the chain. Returns the ends, one per rank; empty if
   * the transport failed meanwhile (another rank found the culprit first, and aborted).
   */
  std::vector<StalledPeer> trace_stall(const std::vector<int>& peers);
  // "rank 3 (ADDRESS) did not answer (stopped, or cut off), and this rank waits on it through
  // 2 other ranks that wait in turn"
  std::string describe(const StalledPeer& stalled) const;
  // Why a receive of `expected` from `peer` timed out, as trace_stall finds it; empty if the
  // transport failed meanwhile.
  std::string why_receive_timed_out(int peer, const FrameHeader& expected);
  // "every rank this rank receives from (rank 1 (ADDRESS), ...) has closed its communicator"
  std::string all_sources_gone(const std::vector<int>& sources) const;
  // The same as why_receive_timed_out for a receive from any of `sources`.
  std::string why_any_receive_timed_out(const std::vector<int>& sources, const FrameHeader& expected);

  // Asks `peer` which rank it waits to receive from (a kStalled frame; a peer answers whatever
  // it is doing) and waits up to kStalledGraceSeconds for the answer: that rank, or kNobody,
  // kNoAnswer, kFailedMeanwhile (this transport failed).
  virtual int ask_waiting_on(int peer) = 0;
  static constexpr int kNobody = -1, kNoAnswer = -2, kFailedMeanwhile = -3;
  // The rank that a pending receive of this transport waits on; kNobody if none.
  virtual int awaited_rank() = 0;
  static constexpr double kStalledGraceSeconds = 0.5;

  // Fails every pending and future request with `reason` and tells every peer. Idempotent;
  // the first reason wins.
  virtual void abort(const std::string& reason, bool timed_out = false) = 0;
  // After abort(): blocks until no posted buffer will be touched again.
  virtual void quiesce() = 0;
  // Why the transport failed; empty while it has not. For loops that wait on other things too
  // (the reduction server's channels, the shared board), so that they do not outwait a failed job.
  virtual TransportFailure failure() = 0;

  // Sends every peer a notice (`about` and `text` are the caller's to define), behind what was
  // sent to it before, without waiting for it to go out. A peer takes it as soon as it has
  // read every earlier message from this rank, whatever it waits for.
  virtual void notify(uint32_t about, const std::string& text) = 0;
  // The notices that arrived since the last call, in order of arrival.
  virtual std::vector<PeerNotice> take_notices() = 0;

  // A thread of the routing transport this one is part of blocks on another part (begins), or
  // no longer does: meanwhile this part's requests must move without that thread's help.
  virtual void waiting_elsewhere(bool /*begins*/) {}
  // waiting_elsewhere(true) for the life of a scope, and (false) when it ends, however.
  class WaitingElsewhere {
   public:
    explicit WaitingElsewhere(Transport& part) : part_(part) { part_.waiting_elsewhere(true); }
    ~WaitingElsewhere() { part_.waiting_elsewhere(false); }
    WaitingElsewhere(const WaitingElsewhere&) = delete;
    WaitingElsewhere& operator=(const WaitingElsewhere&) = delete;

   private:
    Transport& part_;
  };

  // Makes this transport carry part of `whole`'s traffic (a RoutingTransport, which outlives
  // it): its first failure fails the whole, and what it answers and asks about stalls speaks
  // for the whole (a receive may wait on a rank that another part reaches).
  void become_part_of(Transport* whole) { whole_.store(whole); }
  // The transport that carries messages to and from `peer`: this one, or a part of it.
  virtual Transport* part_for(int /*peer*/) { return this; }

 protected:
  // The receives from any source and the point-to-point numbers: the whole's, for a part.
  ReceiveMatching& matching() {
    Transport* whole = whole_.load();
    return whole ? whole->matching_ : matching_;
  }
  // `peer` closed its communicator, and its last message to this rank was read here: fails this
  // transport if a receive from any source now waits on ranks that have all gone. Unless this is
  // a part that does not carry that peer's messages (a routing transport's TCP part hears the
  // goodbye of a peer reached over shared memory too).
  void source_gone(int peer);
  // recv_any once its arguments are checked: by default a receive that waits in matching() for
  // the links to offer it a frame; a transport that matches messages itself (UCX) posts its own.
  virtual TransportRequest post_recv_any(std::vector<int> sources, const FrameHeader& expected, void* data);
  // wait_until() of a receive from any source, for implementations whose receives it is: woken
  // through matching(), it lets this transport's threads move the bytes meanwhile
  // (waiting_elsewhere), and after a failure returns (throwing) once quiesce() has.
  bool wait_any_until(const TransportRequest& request, Deadline deadline, Clock::time_point until);
  // For implementations: once their first failure sticks, so that the whole fails with it.
  void failed_first(const std::string& reason, bool timed_out) {
    if (Transport* whole = whole_.load()) whole->abort(reason, timed_out);
  }
  // What this rank answers to a stall question: the rank it waits on, or kNobody.
  int rank_waited_on() {
    Transport* whole = whole_.load();
    return whole ? whole->awaited_rank() : awaited_rank();
  }
  // Why a wait on `request` reached its deadline: a send waits on the peer's reading, so it
  // names that peer; a receive says what trace_stall finds (empty: the transport failed
  // meanwhile). Called without the implementation's locks: it asks peers and waits.
  std::string why_timed_out(const TransportOperation& request);
  // The deadline loop of an implementation's wait_until(): blocks on `changed` (with `lock`
  // held) until finished() (true) or until `until` passes before the deadline (false); at the
  // deadline finds why (without the lock) and aborts, unless the request finished meanwhile or
  // another rank named the culprit first.
  template <typename Finished>
  bool await(std::unique_lock<std::mutex>& lock, std::condition_variable& changed, const TransportOperation& request,
             Deadline deadline, Clock::time_point until, Finished finished) {
    while (!finished()) {
      if (changed.wait_until(lock, std::min(deadline, until)) != std::cv_status::timeout || finished()) continue;
      if (Clock::now() < deadline) return false;
      lock.unlock();
      const std::string reason = why_timed_out(request);
      lock.lock();
      if (finished()) continue;
      lock.unlock();
      abort(reason, true);
      lock.lock();
    }
    return true;
  }

 private:
  std::atomic<Transport*> whole_{nullptr};
  ReceiveMatching matching_;
};

}  // namespace collectives
