// Shared-memory transport between ranks of one host. Each pair of ranks shares a segment
// (shm/segment.h) with a ring per direction; a message is a frame (FrameHeader, then payload)
// written into the ring by the sender and copied out by the receiver straight into the
// posted buffer, once its header has been checked against the receive's.
//
// Large messages (kDirectMinBytes and up) go by reference where the receiver can read the
// sender's memory (the peer's pid is known, and the kernel lets it: same user, no seccomp
// filter in the way; tried once per pair, RingControl::reads_directly): the ring carries the
// header and the payload's address, and the receiver copies the payload straight from the
// sender's buffer (process_vm_readv), one copy instead of two (into the ring and out of it).
// The send is done once the receiver says it has copied it (RingControl::taken_directly).
//
// Matching by communicator, with frames read ahead, as transport/matching.h says.
//
// Progress: whoever waits drives the rings itself, spinning for a while (yielding the core where
// the host has more ranks than cores), so a small message costs no hand-off between threads; a
// progress thread does the rest (a wait that outlasts the spin, stall questions, notices, a
// peer's death) and sleeps in epoll when there is nothing to move, so an idle rank burns no CPU.
// Before sleeping while a thread waits on it, it raises the "asleep" flags of its rings; a peer
// that moves a ring's head or tail past a raised flag rings this rank's doorbell (an eventfd it
// was handed), one system call per sleep at most (prepare_to_sleep says when it is wanted).
//
// Failure model, as TcpTransport's: the first failure sticks, fails every pending and later
// request, and reaches every peer with its reason (through each ring's control block, which a
// full ring does not hold up). A peer's death is seen at once: its watch descriptor (ShmLink),
// polled by the progress thread, becomes readable without the goodbye flag raised first.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/file_descriptor.h"
#include "transport/shm/ring.h"
#include "transport/shm/segment.h"
#include "transport/socket.h"
#include "transport/transport.h"

namespace collectives {

// What a rank holds of one same-host peer; all three descriptors are owned by the transport.
struct ShmLink {
  int segment_fd = -1;   // the pair's segment (create_shm_segment), made by either of the two
  // Becomes readable once the peer is gone: a pidfd of its process, or a Unix socket whose
  // other end only the peer holds (for ranks that are threads of one process, in tests).
  int watch_fd = -1;
  int doorbell_fd = -1;  // the peer's doorbell (create_shm_doorbell): written to wake it
  // The peer's process, vouched for by the kernel (SO_PEERCRED), whose memory this rank may
  // read large messages from directly; 0: every message goes through the ring.
  int pid = 0;
};

class ShmTransport : public Transport {
 public:
  // links[p]: the link to rank p, or one of descriptors -1 where p is not reached over shared
  // memory (and never addressed through this transport). doorbell_fd: this rank's doorbell,
  // whose write ends the peers hold. peer_names[p] names rank p in error messages.
  ShmTransport(int rank, int size, int doorbell_fd, std::vector<ShmLink> links, std::vector<std::string> peer_names);
  ~ShmTransport() override;
  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& peer_name(int peer) const override { return peer_names_[peer]; }

  TransportRequest send(int peer, const FrameHeader& header, const void* data) override;
  TransportRequest recv(int peer, const FrameHeader& expected, void* data) override;
  bool receives_from_any_source() const override { return true; }
  void offer_waiting_frames(const std::shared_ptr<PostedOperation>& op) override;
  bool wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) override;
  int ask_waiting_on(int peer) override;
  // Also for a waiter of its own that stops driving the rings and blocks (wait_until).
  void waiting_elsewhere(bool begins) override;
  int awaited_rank() override;
  void abort(const std::string& reason, bool timed_out = false) override;
  void quiesce() override;
  TransportFailure failure() override;
  void notify(uint32_t about, const std::string& text) override;
  std::vector<PeerNotice> take_notices() override;

 private:
  using Operation = PostedOperation;
  using OperationPtr = std::shared_ptr<Operation>;
  struct Peer;

  OperationPtr post(int peer, const FrameHeader& header, void* data, bool is_send);
  // Moves whatever can move on every ring; true if anything did. With progress_mutex_ held.
  bool drive_locked();
  // Tries to drive from a waiting thread; false if another thread drives now.
  bool try_drive();
  bool write_some(Peer& peer);
  bool read_some(Peer& peer);
  // A header is readable: match it with its receive and start the payload (false: parked).
  bool take_header(Peer& peer);
  bool take_notice(Peer& peer, const FrameHeader& header);
  // A frame read ahead is whole: it waits for its receive (or fills one posted meanwhile).
  void stash_ahead(Peer& peer);
  // The control block's news from the peer: its abort, a stall question, the messages it has
  // copied by reference; and whether this rank can copy the peer's by reference.
  void check_control(Peer& peer);
  // Copies n payload bytes of the frame being read into `into`: from the ring, or from the
  // sender's memory for a frame by reference. False (and the transport failed) if it could not.
  bool copy_payload(Peer& peer, char* into, uint64_t n);
  void progress_loop();
  // Raises the asleep flags and checks once more; true if the progress thread may sleep.
  bool prepare_to_sleep();
  void raise_asleep_flags(uint32_t raised);  // 1: peers ring the doorbell when they move a ring; 0: not
  void handle_gone(Peer& peer);
  void ring(Peer& peer);  // the peer's doorbell
  // Hands the first n readable bytes of the peer's ring back to it, waking it if it waits for room.
  void consume(Peer& peer, uint64_t n);
  void complete(Operation& op);
  void fail(const std::string& reason, bool timed_out);
  bool has_failed();

  // Messages that go by reference from this size on: below it, a system call and the wait for
  // the receiver's word cost more than the copy they save.
  static constexpr uint64_t kDirectMinBytes = 64 << 10;

  const int rank_;
  const int size_;
  const uint64_t direct_probe_ = RingControl::kDirectProbe;  // read by the peers (probe_address)
  const std::vector<std::string> peer_names_;
  FileDescriptor doorbell_;
  std::vector<std::unique_ptr<Peer>> peers_;  // [rank]; null where not over shared memory
  Poller poller_;  // the doorbell, the peers' watch descriptors, and local wake-ups

  // Held while bytes move between rings and posted buffers; taken before mutex_.
  std::mutex progress_mutex_;

  std::mutex mutex_;  // guards queues, completion flags and the failure fields below
  std::condition_variable completed_;
  bool failed_ = false;
  bool failure_timed_out_ = false;
  bool stopping_ = false;
  std::string failure_;
  std::vector<PeerNotice> notices_;

  bool oversubscribed_ = true;  // more ranks on this host than cores: a spinning waiter yields
  std::atomic<bool> asleep_{false};  // the progress thread sleeps (or is about to): wake it
  std::atomic<int> blocked_waiters_{0};  // threads that wait on the progress thread (waiting_elsewhere)
  std::thread progress_thread_;
};

}  // namespace collectives
