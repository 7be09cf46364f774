#include "transport/shm/shm_transport.h"

#include <errno.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "transport/matching.h"
#include "transport/shm/waiting.h"

namespace collectives {

struct ShmTransport::Peer {
  int rank = 0;
  FileDescriptor segment, watch, doorbell;
  ShmMapping mapping;
  RingView out, in;  // this rank writes `out` and reads `in`
  // Guarded by mutex_: sends in posting order; receives by communicator (FrameHeader::comm),
  // each in posting order; frames read ahead for a communicator with none posted (matching.h).
  std::deque<OperationPtr> sends;
  std::map<uint64_t, std::deque<OperationPtr>> recvs;
  std::map<uint64_t, std::deque<StashedFrame>> stashed;
  // Set and cleared with both locks held, so read under either.
  OperationPtr sending, receiving;
  bool closed = false;  // guarded by mutex_: the peer said goodbye, and its end is gone
  pid_t pid = 0;  // ShmLink::pid
  // progress_mutex_ only:
  uint64_t sent = 0;       // bytes of `sending`'s frame (header and payload) in the ring
  // `sending` goes by reference: its frame in the ring is this header and the payload's address.
  bool sending_directly = false;
  char reference[sizeof(FrameHeader) + sizeof(uint64_t)];
  std::deque<OperationPtr> awaiting_copy;  // sent by reference, not yet copied by the peer
  uint64_t copies_seen = 0;                // of the peer's taken_directly
  uint64_t remote_payload = 0;             // the frame being read is by reference: its address
  bool in_frame = false;   // a header was taken: its payload goes to `receiving` or `ahead`
  bool reading_ahead = false;
  StashedFrame ahead;      // the frame read ahead
  uint64_t received = 0;   // payload bytes of the frame copied out
  bool watched = true;     // its watch descriptor is polled (until the peer is gone)
  bool gone_told = false;  // guarded by mutex_: closed, its ring read to the end, and matching() told
};

namespace {

constexpr uint64_t kHeaderBytes = sizeof(FrameHeader);
// Bytes moved on one ring before the others get their turn, so one busy peer cannot starve
// the rest.
constexpr uint64_t kFairnessBudget = 1 << 20;
// How long the progress thread looks for more work after the last it found before it sleeps
// (a waiting thread drives the rings itself for kShmWaitSpin before it blocks).
constexpr auto kProgressSpin = std::chrono::microseconds(10);
constexpr auto kAnswerPoll = std::chrono::milliseconds(1);

using Clock = std::chrono::steady_clock;

// Dekker's pattern between a side that moved a ring and one that is about to sleep on it:
// each stores (head or tail; the asleep flag), then fences, then loads the other's. At least
// one of them sees the other's store: the sleeper sees the move, or the mover sees the flag.
bool should_wake(std::atomic<uint32_t>& asleep) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return asleep.load(std::memory_order_relaxed) != 0 && asleep.exchange(0) != 0;
}

}  // namespace

ShmTransport::ShmTransport(int rank, int size, int doorbell_fd, std::vector<ShmLink> links,
                           std::vector<std::string> peer_names)
    : rank_(rank), size_(size), peer_names_(std::move(peer_names)), doorbell_(doorbell_fd) {
  // Own every descriptor first, so that each is closed whatever fails below.
  peers_.resize(links.size());
  for (size_t p = 0; p < links.size(); ++p) {
    const ShmLink& link = links[p];
    if (link.segment_fd < 0 && link.watch_fd < 0 && link.doorbell_fd < 0) continue;
    peers_[p] = std::make_unique<Peer>();
    peers_[p]->rank = static_cast<int>(p);
    peers_[p]->segment = FileDescriptor(link.segment_fd);
    peers_[p]->watch = FileDescriptor(link.watch_fd);
    peers_[p]->doorbell = FileDescriptor(link.doorbell_fd);
    peers_[p]->pid = link.pid;
  }
  if (size < 1 || rank < 0 || rank >= size) throw std::invalid_argument("rank out of range");
  if (static_cast<int>(links.size()) != size || static_cast<int>(peer_names_.size()) != size) {
    throw std::invalid_argument("need one shared-memory link and one name per rank");
  }
  if (peers_[rank]) throw std::invalid_argument("a rank has no shared-memory link to itself");
  poller_.watch(doorbell_.get(), 0, EPOLLIN, &doorbell_);
  for (auto& peer : peers_) {
    if (!peer) continue;
    if (peer->segment.get() < 0 || peer->watch.get() < 0 || peer->doorbell.get() < 0) {
      throw std::invalid_argument("the shared-memory link to " + peer_names_[peer->rank] + " lacks a descriptor");
    }
    peer->mapping = ShmMapping(peer->segment.get());
    // control[0] and data[0] carry the lower rank's messages to the higher one.
    ShmSegmentLayout* layout = peer->mapping.get();
    const int mine = rank < peer->rank ? 0 : 1;
    peer->out = RingView(&layout->control[mine], layout->data[mine], kShmRingBytes);
    peer->in = RingView(&layout->control[1 - mine], layout->data[1 - mine], kShmRingBytes);
    peer->out.control().probe_address.store(reinterpret_cast<uint64_t>(&direct_probe_), std::memory_order_release);
    poller_.watch(peer->watch.get(), 0, EPOLLIN, peer.get());
  }
  oversubscribed_ = ranks_outnumber_cores(
      1 + static_cast<int>(std::count_if(peers_.begin(), peers_.end(), [](auto& p) { return p != nullptr; })));
  progress_thread_ = std::thread([this] { progress_loop(); });
}

ShmTransport::~ShmTransport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  poller_.wake();
  progress_thread_.join();
  if (has_failed()) return;  // the peers were told why instead
  // Nothing is in flight: a collective returns only once its frames are in the rings. The
  // flag goes up before the watch descriptor closes, so the peer reads it as a goodbye.
  for (auto& peer : peers_) {
    if (!peer) continue;
    peer->out.control().closed.store(1, std::memory_order_release);
    ring(*peer);
  }
}

TransportRequest ShmTransport::send(int peer, const FrameHeader& header, const void* data) {
  return post(peer, header, const_cast<void*>(data), /*is_send=*/true);
}

TransportRequest ShmTransport::recv(int peer, const FrameHeader& expected, void* data) {
  return post(peer, expected, data, /*is_send=*/false);
}

// No wake-up here: every posted request is waited on, and a waiting thread drives every ring,
// or has the progress thread do it while it waits on another part of a routing transport
// (waiting_elsewhere); notify() wakes the progress thread for the frames nobody waits on.
ShmTransport::OperationPtr ShmTransport::post(int peer, const FrameHeader& header, void* data, bool is_send) {
  auto op = std::make_shared<Operation>();
  op->peer = peer;
  op->is_send = is_send;
  op->header = header;
  op->data = static_cast<char*>(data);
  if (!is_send) op->order = matching().next_order();
  Peer& to = *peers_.at(peer);
  bool gone = false;
  std::string refused;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& stash = to.stashed[uint64_t{header.comm}];
    // A closed peer's last frames may still be waiting in the ring for their receives.
    gone = !failed_ && to.closed && (is_send || (to.in.readable() == 0 && stash.empty()));
    if (failed_ || gone) {
      op->done = true;  // not ok: wait() reports the failure
    } else if (!is_send && !stash.empty()) {
      matching().number(peer, op->header);
      refused = take_stashed(stash, *op);
      matching().finish(*op, refused.empty());
    } else {
      (is_send ? to.sends : to.recvs[uint64_t{header.comm}]).push_back(op);
    }
  }
  if (gone) abort(peer_has_closed(peer_names_[peer]));
  if (!refused.empty()) fail(peer_names_[peer] + " sent " + refused, false);
  return op;
}

void ShmTransport::offer_waiting_frames(const OperationPtr& op) {
  std::string refused;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return;
    for (int rank : op->sources) {
      Peer* peer = peers_.at(rank).get();
      if (!peer) continue;  // not this transport's (a routing transport's other part)
      auto& stash = peer->stashed[uint64_t{op->header.comm}];
      if (stash.empty() || !matching().claim(*op, rank)) continue;
      refused = take_stashed(stash, *op);
      matching().finish(*op, refused.empty());
      if (!refused.empty()) refused = peer_names_[rank] + " sent " + refused;
      break;
    }
  }
  if (!refused.empty()) fail(refused, false);
  poller_.wake();  // a parked frame may be the one it waits for
}

void ShmTransport::notify(uint32_t about, const std::string& text) {
  for (auto& peer : peers_) {
    if (!peer) continue;
    OperationPtr op = Operation::notice(peer->rank, about, text);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!failed_ && !peer->closed) peer->sends.push_back(op);
  }
  poller_.wake();
}

std::vector<PeerNotice> ShmTransport::take_notices() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(notices_, {});
}

bool ShmTransport::wait_until(const TransportRequest& posted, Deadline deadline, Clock::time_point until) {
  if (posted->from_any_source()) return wait_any_until(posted, deadline, until);
  // Every request waited on here was made by post().
  Operation* request = static_cast<Operation*>(posted.get());
  auto finished = [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    return request->done || failed_;
  };
  for (const auto spin_end = Clock::now() + kShmWaitSpin; !finished() && Clock::now() < spin_end;) {
    if (!try_drive() && oversubscribed_) std::this_thread::yield();
  }
  // From here on the progress thread moves the bytes, woken by the peers' doorbell rings.
  const WaitingElsewhere blocked(*this);
  std::unique_lock<std::mutex> lock(mutex_);
  if (!await(lock, completed_, *request, deadline, until, [&] { return request->done || failed_; })) return false;
  // A request that completed stays good even if the transport failed afterwards.
  if (request->ok) return true;
  const TransportFailure failure{failure_, failure_timed_out_};
  lock.unlock();
  quiesce();  // the caller may free buffers next
  failure.raise();
}

int ShmTransport::ask_waiting_on(int peer) {
  Peer& to = *peers_.at(peer);
  RingControl& control = to.out.control();
  const uint64_t question = control.question.load(std::memory_order_relaxed) + 1;
  control.question.store(question, std::memory_order_release);
  ring(to);
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(kStalledGraceSeconds));
  while (!has_failed()) {
    if (control.answered.load(std::memory_order_acquire) == question) {
      const int64_t answer = control.answer.load(std::memory_order_relaxed);
      if (answer >= kNobody && answer < size_) return static_cast<int>(answer);
      fail(peer_names_[peer] + " said it waits on rank " + std::to_string(answer) + ", which does not exist", false);
      break;
    }
    if (Clock::now() >= deadline) return kNoAnswer;
    std::this_thread::sleep_for(kAnswerPoll);
  }
  return kFailedMeanwhile;
}

int ShmTransport::awaited_rank() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& peer : peers_) {
    if (peer && (peer->receiving || any_waiting(peer->recvs))) return peer->rank;
  }
  return matching().awaited_rank();
}

void ShmTransport::abort(const std::string& reason, bool timed_out) { fail(reason, timed_out); }

void ShmTransport::quiesce() {
  // Bytes move only with progress_mutex_ held, and never once the transport has failed.
  std::lock_guard<std::mutex> moving(progress_mutex_);
}

TransportFailure ShmTransport::failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failed_ ? TransportFailure{failure_, failure_timed_out_} : TransportFailure{};
}

bool ShmTransport::has_failed() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failed_;
}

void ShmTransport::fail(const std::string& reason, bool timed_out) {
  const std::string first = reason.empty() ? std::string("failed") : reason;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!failure_.empty()) {
      // The first reason wins; but a caller may take its buffers back once this returns, so
      // not before the first failure is complete (the peers told, no bytes moving).
      completed_.wait(lock, [&] { return failed_; });
      return;
    }
    failure_ = first;
  }
  // Peers hear "rank R aborted: <reason>" (they name the sender), so every rank's error names
  // the first cause. Only the first failure gets here, so the reason is written once. The
  // peers hear it before any wait here throws: a caller may change its buffers from then on,
  // and a peer copying one by reference must see the flag by then (copy_payload).
  const std::string text = first.substr(0, kMaxAbortReason);
  for (auto& peer : peers_) {
    if (!peer) continue;
    RingControl& control = peer->out.control();
    std::memcpy(control.reason, text.data(), text.size());
    control.reason_bytes = static_cast<uint32_t>(text.size());
    control.aborted.store(timed_out ? RingControl::kTimedOut : RingControl::kAborted, std::memory_order_release);
    ring(*peer);
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);  // the flags before any later change of a buffer
  {
    std::lock_guard<std::mutex> lock(mutex_);
    failed_ = true;
    failure_timed_out_ = timed_out;
    completed_.notify_all();
  }
  matching().fail();
  failed_first(reason, timed_out);
  poller_.wake();
}

void ShmTransport::consume(Peer& peer, uint64_t n) {
  peer.in.consume(n);
  if (should_wake(peer.in.control().writer_asleep)) ring(peer);
}

void ShmTransport::ring(Peer& peer) {
  const uint64_t one = 1;
  // A full counter already means "wake up": nothing is lost if the write fails.
  [[maybe_unused]] ssize_t ignored = ::write(peer.doorbell.get(), &one, sizeof(one));
}

void ShmTransport::complete(Operation& op) {
  std::lock_guard<std::mutex> lock(mutex_);
  matching().finish(op, true);
  Peer& peer = *peers_[op.peer];
  if (peer.sending.get() == &op) peer.sending.reset();
  if (peer.receiving.get() == &op) peer.receiving.reset();
  completed_.notify_all();
}

bool ShmTransport::try_drive() {
  std::unique_lock<std::mutex> moving(progress_mutex_, std::try_to_lock);
  return moving.owns_lock() && drive_locked();
}

bool ShmTransport::drive_locked() {
  bool moved = false;
  for (auto& peer : peers_) {
    if (!peer) continue;
    check_control(*peer);
    if (has_failed()) return false;  // posted buffers may be handed back from here on
    moved |= write_some(*peer);
    moved |= read_some(*peer);
    bool owed, drained;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drained = peer->closed && peer->in.readable() == 0 && !peer->gone_told;
      owed = peer->closed && (peer->sending || !peer->sends.empty() || !peer->awaiting_copy.empty() ||
                              ((peer->receiving || any_waiting(peer->recvs)) && peer->in.readable() == 0));
      peer->gone_told |= drained;
    }
    if (owed) fail(peer_closed_mid_exchange(peer_names_[peer->rank]), false);
    if (drained) source_gone(peer->rank);
  }
  return moved;
}

void ShmTransport::check_control(Peer& peer) {
  RingControl& control = peer.in.control();
  if (const uint32_t aborted = control.aborted.load(std::memory_order_acquire)) {
    const size_t bytes = std::min<size_t>(control.reason_bytes, kMaxAbortReason);
    fail(peer_names_[peer.rank] + " aborted: " + std::string(control.reason, bytes), aborted == RingControl::kTimedOut);
    return;
  }
  const uint64_t question = control.question.load(std::memory_order_acquire);
  if (question != control.answered.load(std::memory_order_relaxed)) {
    control.answer.store(rank_waited_on(), std::memory_order_relaxed);
    control.answered.store(question, std::memory_order_release);
  }
  // Whether this rank can read the peer's memory: tried once, on the word the peer set out.
  const uint64_t probe = control.probe_address.load(std::memory_order_acquire);
  if (probe != 0 && control.reads_directly.load(std::memory_order_relaxed) == RingControl::kUntried) {
    uint64_t seen = 0;
    const iovec local{&seen, sizeof(seen)}, remote{reinterpret_cast<void*>(probe), sizeof(seen)};
    const bool can = peer.pid > 0 && ::process_vm_readv(peer.pid, &local, 1, &remote, 1, 0) == sizeof(seen) &&
                     seen == RingControl::kDirectProbe;
    control.reads_directly.store(can ? RingControl::kReadsDirectly : RingControl::kCannot, std::memory_order_release);
  }
  // The sends the peer has copied by reference, in the order they went.
  const uint64_t copied = peer.out.control().taken_directly.load(std::memory_order_acquire);
  for (; peer.copies_seen < copied && !peer.awaiting_copy.empty(); ++peer.copies_seen) {
    complete(*peer.awaiting_copy.front());
    peer.awaiting_copy.pop_front();
  }
  if (peer.copies_seen != copied) {
    fail(peer_names_[peer.rank] + " said it copied " + std::to_string(copied) + " messages by reference, of " +
             std::to_string(peer.copies_seen) + " sent", false);
  }
}

bool ShmTransport::copy_payload(Peer& peer, char* into, uint64_t n) {
  if (peer.remote_payload == 0) {
    peer.in.peek(0, into, n);
    consume(peer, n);
    return true;
  }
  const iovec local{into, n}, remote{reinterpret_cast<void*>(peer.remote_payload + peer.received), n};
  const ssize_t got = ::process_vm_readv(peer.pid, &local, 1, &remote, 1, 0);
  if (got == static_cast<ssize_t>(n)) {
    // A sender that failed meanwhile may have handed the buffer back to its caller, who may be
    // changing it: such a copy is no message. The sender raises `aborted` before its abort
    // returns, so a copy that saw its caller's changes sees the flag too.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (peer.in.control().aborted.load(std::memory_order_acquire) == 0) return true;
    check_control(peer);  // fails with the sender's reason
    return false;
  }
  fail("could not copy a message from " + peer_names_[peer.rank] + "'s memory (" +
           (got < 0 ? errno_text(errno) : std::to_string(got) + " of " + std::to_string(n) + " bytes") + ")",
       false);
  return false;
}

bool ShmTransport::write_some(Peer& peer) {
  bool moved = false;
  for (uint64_t budget = kFairnessBudget; budget > 0;) {
    if (!peer.sending) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (failed_ || peer.sends.empty()) break;
      peer.sending = peer.sends.front();
      peer.sends.pop_front();
      peer.sent = 0;
      const FrameHeader& header = peer.sending->header;
      peer.sending_directly = header.kind == static_cast<uint8_t>(FrameKind::kData) && header.nbytes >= kDirectMinBytes &&
                              peer.out.control().reads_directly.load(std::memory_order_acquire) ==
                                  RingControl::kReadsDirectly;
      if (peer.sending_directly) {
        FrameHeader by_reference = header;
        by_reference.kind = static_cast<uint8_t>(FrameKind::kByReference);
        const auto address = reinterpret_cast<uint64_t>(peer.sending->data);
        std::memcpy(peer.reference, &by_reference, kHeaderBytes);
        std::memcpy(peer.reference + kHeaderBytes, &address, sizeof(address));
      }
    }
    Operation& op = *peer.sending;
    const uint64_t frame = peer.sending_directly ? sizeof(peer.reference) : kHeaderBytes + op.header.nbytes;
    const uint64_t n = std::min({peer.out.writable(), budget, frame - peer.sent});
    if (n == 0) break;  // the ring is full
    if (peer.sending_directly) {
      peer.out.put(0, peer.reference + peer.sent, n);
    } else {
      // The frame is one byte stream, header first: this piece may end inside the header,
      // start inside it and run into the payload, or lie within the payload.
      uint64_t put = 0;
      if (peer.sent < kHeaderBytes) {
        put = std::min(n, kHeaderBytes - peer.sent);
        peer.out.put(0, reinterpret_cast<const char*>(&op.header) + peer.sent, put);
      }
      if (put < n) peer.out.put(put, op.data + (peer.sent + put - kHeaderBytes), n - put);
    }
    peer.out.publish(n);
    if (should_wake(peer.out.control().reader_asleep)) ring(peer);
    peer.sent += n;
    budget -= n;
    moved = true;
    if (peer.sent < frame) continue;
    if (peer.sending_directly) {  // done once the peer has copied it (check_control)
      peer.awaiting_copy.push_back(peer.sending);
      std::lock_guard<std::mutex> lock(mutex_);
      peer.sending.reset();
      continue;
    }
    // A notice is read whatever the peer waits for: its progress thread must wake for it even
    // if nobody there waits on these rings (prepare_to_sleep).
    const bool notice = op.header.kind == static_cast<uint8_t>(FrameKind::kNotice);
    complete(op);
    if (notice) ring(peer);
  }
  return moved;
}

bool ShmTransport::read_some(Peer& peer) {
  bool moved = false;
  for (uint64_t budget = kFairnessBudget; budget > 0;) {
    const uint64_t readable = peer.in.readable();
    if (readable > kShmRingBytes) {
      fail(peer_names_[peer.rank] + " left its shared-memory ring inconsistent (" + std::to_string(readable) +
               " bytes readable of " + std::to_string(kShmRingBytes) + ")", false);
      break;
    }
    if (!peer.in_frame) {  // between frames
      if (readable < kHeaderBytes || !take_header(peer)) break;
      moved = true;
      continue;
    }
    const uint64_t nbytes = peer.reading_ahead ? peer.ahead.header.nbytes : peer.receiving->header.nbytes;
    char* into = peer.reading_ahead ? peer.ahead.payload.data() : peer.receiving->data;
    const uint64_t available = peer.remote_payload ? nbytes : readable;
    const uint64_t n = std::min({available, budget, nbytes - peer.received});
    if (n > 0) {
      if (!copy_payload(peer, into + peer.received, n)) break;
      peer.received += n;
      budget -= n;
      moved = true;
    }
    if (peer.received == nbytes) {
      peer.in_frame = false;
      if (peer.remote_payload) {  // the sender's buffer is its own again
        peer.remote_payload = 0;
        peer.in.control().taken_directly.fetch_add(1, std::memory_order_release);
        if (should_wake(peer.in.control().writer_asleep)) ring(peer);
      }
      if (peer.reading_ahead) {
        stash_ahead(peer);
      } else {
        complete(*peer.receiving);
      }
      continue;
    }
    if (n == 0) break;
  }
  return moved;
}

bool ShmTransport::take_header(Peer& peer) {
  const std::string& who = peer_names_[peer.rank];
  FrameHeader h;
  peer.in.peek(0, &h, kHeaderBytes);
  if (h.magic == kFrameMagic && h.kind == static_cast<uint8_t>(FrameKind::kNotice)) return take_notice(peer, h);
  // By reference: a kData frame whose payload is at the address that follows the header.
  uint64_t remote_payload = 0;
  if (h.magic == kFrameMagic && h.kind == static_cast<uint8_t>(FrameKind::kByReference)) {
    if (peer.in.control().reads_directly.load(std::memory_order_relaxed) != RingControl::kReadsDirectly) {
      fail(who + " sent a message by reference, which this rank cannot read", false);
      return false;
    }
    if (peer.in.readable() < kHeaderBytes + sizeof(remote_payload)) return false;  // the rest is on its way
    peer.in.peek(kHeaderBytes, &remote_payload, sizeof(remote_payload));
    if (remote_payload == 0) {
      fail(who + " sent a message by reference without its address", false);
      return false;
    }
    h.kind = static_cast<uint8_t>(FrameKind::kData);
  }
  if (h.magic == kFrameMagic && h.kind != static_cast<uint8_t>(FrameKind::kData)) {
    fail(who + " sent a frame of kind " + std::to_string(h.kind) + ", which no shared-memory link carries", false);
    return false;
  }
  OperationPtr op;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return false;
    op = place_frame(h, peer.rank, peer.recvs, peer.stashed, matching(), &peer.reading_ahead);
    if (!peer.reading_ahead && !op) return false;  // parked until its receive is posted
    peer.receiving = op;
  }
  if (peer.reading_ahead) {
    std::string refused;
    peer.ahead = {h, read_ahead_buffer(who, h, &refused)};
    if (!refused.empty()) {
      fail(refused, false);
      return false;
    }
  } else if (const std::string why = mismatch(op->header, h); !why.empty()) {
    fail(who + " sent " + why, false);
    return false;
  }
  consume(peer, kHeaderBytes + (remote_payload ? sizeof(remote_payload) : 0));
  peer.in_frame = true;
  peer.received = 0;
  peer.remote_payload = remote_payload;
  return true;
}

void ShmTransport::stash_ahead(Peer& peer) {
  std::string refused;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const uint64_t comm = peer.ahead.header.comm;
    peer.stashed[comm].push_back(std::move(peer.ahead));
    // A receive posted while the frame was read, for its sender or from any source.
    if (OperationPtr op = matching().take(peer.rank, comm, peer.recvs[comm])) {
      refused = take_stashed(peer.stashed[comm], *op);
      matching().finish(*op, refused.empty());
      completed_.notify_all();
    }
  }
  if (!refused.empty()) fail(peer_names_[peer.rank] + " sent " + refused, false);
}

bool ShmTransport::take_notice(Peer& peer, const FrameHeader& h) {
  if (h.nbytes > kMaxAbortReason) {
    fail(peer_names_[peer.rank] + " sent a notice of " + std::to_string(h.nbytes) + " bytes", false);
    return false;
  }
  if (peer.in.readable() < kHeaderBytes + h.nbytes) return false;  // the rest is on its way
  std::string text(h.nbytes, '\0');
  if (h.nbytes > 0) peer.in.peek(kHeaderBytes, text.data(), h.nbytes);
  consume(peer, kHeaderBytes + h.nbytes);
  std::lock_guard<std::mutex> lock(mutex_);
  notices_.push_back({peer.rank, h.unit, std::move(text)});
  return true;
}

void ShmTransport::handle_gone(Peer& peer) {
  char scratch[64];
  const ssize_t got = ::recv(peer.watch.get(), scratch, sizeof(scratch), MSG_DONTWAIT);
  if (got > 0 || (got < 0 && would_block(errno))) return;  // a socket with bytes in it: not an end
  // A socket's end of stream, or a pidfd (no socket) that became readable: the peer is gone.
  poller_.watch(peer.watch.get(), EPOLLIN, 0, &peer);
  peer.watched = false;
  if (!peer.in.control().closed.load(std::memory_order_acquire)) return fail(peer_exited(peer_names_[peer.rank]), false);
  std::lock_guard<std::mutex> lock(mutex_);
  peer.closed = true;  // a goodbye: drive_locked() fails only if this rank still needed it
}

void ShmTransport::waiting_elsewhere(bool begins) {
  if (!begins) {
    --blocked_waiters_;
    return;
  }
  ++blocked_waiters_;
  if (asleep_.load() && !prepare_to_sleep()) poller_.wake();
}

void ShmTransport::raise_asleep_flags(uint32_t raised) {
  for (auto& peer : peers_) {
    if (!peer) continue;
    peer->in.control().reader_asleep.store(raised);
    peer->out.control().writer_asleep.store(raised);
  }
}

/*
 * The doorbell is wanted only while a thread waits on the progress thread: one blocked in
 * wait_until(), or one waiting on another part of the routing transport, which does not drive
 * these rings (both counted by waiting_elsewhere). A thread that spins in wait_until() drives the rings itself, and a request that
 * nobody waits on yet can wait too: it is driven when it is waited on. Without that, every
 * message would cost a system call and a wake-up of a thread that only competes with the
 * spinning one for the rings (on a host with fewer cores than ranks, a scheduling round each).
 *
 * asleep_ then blocked_waiters_ here, blocked_waiters_ then asleep_ in wait_until(), all
 * sequentially consistent: a waiter that blocks either sees the progress thread asleep (and
 * raises the flags itself, through this function), or the progress thread sees the waiter.
 */
bool ShmTransport::prepare_to_sleep() {
  asleep_.store(true);
  std::lock_guard<std::mutex> moving(progress_mutex_);
  raise_asleep_flags(blocked_waiters_.load() > 0 ? 1 : 0);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return !drive_locked();
}

void ShmTransport::progress_loop() {
  epoll_event events[16];
  auto last_work = Clock::now();
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_ || failed_) return;
    }
    if (try_drive()) {
      last_work = Clock::now();
      continue;
    }
    if (Clock::now() - last_work < kProgressSpin) {
      std::this_thread::yield();
      continue;
    }
    if (prepare_to_sleep()) {
      const int n = poller_.wait(events, 16, -1);
      if (n < 0 && errno != EINTR) fail("epoll_wait failed: " + errno_text(errno), false);
      for (int i = 0; i < n; ++i) {
        if (events[i].data.ptr == &doorbell_) {
          uint64_t count;
          [[maybe_unused]] ssize_t ignored = ::read(doorbell_.get(), &count, sizeof(count));
        } else if (static_cast<Peer*>(events[i].data.ptr)->watched) {
          handle_gone(*static_cast<Peer*>(events[i].data.ptr));
        }
      }
    }
    asleep_.store(false);
    last_work = Clock::now();
  }
}

}  // namespace collectives
