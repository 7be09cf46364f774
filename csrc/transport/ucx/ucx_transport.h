// UCX transport: the data of every message moves through UCX (tagged messages over whatever
// UCX finds: InfiniBand/RoCE verbs, shared memory, TCP), while a TcpTransport over the job's
// authenticated links carries what must be trusted or must outlive a stuck data plane: the
// workers' UCX addresses (exchanged over it at start, never published), aborts, notices, stall
// questions, and the end of a peer's socket when its process dies.
//
// A message is two UCX messages from the sender: its FrameHeader, then its payload, each with
// a tag naming the sender, the communicator (FrameHeader::comm) and which of the two it is
// (ucx_tag). UCX matches messages of one tag from one sender in order, so the n-th receive
// posted for a (peer, communicator) takes that peer's n-th message of that communicator; a
// receive from any source posts its header's receive with the sender's bits of the tag masked
// out, so UCX matches it in posting order with the per-peer ones (MPI_ANY_SOURCE's rule); the
// receiver posts the payload's receive, into the caller's buffer, only once the header has
// arrived and matched the one expected (mismatch), so no byte of a message that disagrees
// reaches the buffer. Nothing is read ahead: UCX holds messages that arrive early.
//
// Failure model, as TcpTransport's: the first failure sticks, fails every pending and later
// request (their UCX requests are cancelled and the endpoints closed before a failed wait
// returns), and reaches every peer over the control links. A peer's death ends its control
// socket (seen at once) and its UCX endpoint (UCP_ERR_HANDLING_MODE_PEER: reported, not hung
// on). A closing rank sends each peer, after its last message, a goodbye with the number of
// messages it sent that peer, and flushes: the peer then knows which of its receives can
// still be matched (a receive beyond that count fails as the peer having closed).
//
// Wire security (wire_security.h) as on the control links: with mac or aead each message's
// header goes with a tag over header and payload, made before it leaves (by the sending thread),
// and a receive's payload lands in staging memory, reaching the caller's buffer only once its
// waiter has checked the tag (the progress thread meanwhile moves other messages). Each lane
// (communicator) of each direction has a key of its own, derived from the control link's, and
// counts its frames: UCX keeps a lane's messages in order, not different lanes' (a payload may
// complete before an earlier header's, so its number is taken as its header arrives). The
// goodbyes are not tagged: a forged one can only fail the job early.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "transport/socket.h"
#include "transport/tcp_transport.h"
#include "transport/transport.h"
#include "transport/ucx/ucx_library.h"

namespace collectives {

class UcxTransport : public Transport {
 public:
  // control_links[p]: connected, authenticated sockets to rank p, as TcpTransport takes them
  // (owned from here on). The UCX addresses are exchanged over them by `deadline`. UCX must
  // be loaded (load_ucx).
  UcxTransport(int rank, int size, std::vector<std::vector<Link>> control_links, std::vector<std::string> peer_names,
               Deadline deadline);
  ~UcxTransport() override;
  UcxTransport(const UcxTransport&) = delete;
  UcxTransport& operator=(const UcxTransport&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& peer_name(int peer) const override { return control_->peer_name(peer); }

  TransportRequest send(int peer, const FrameHeader& header, const void* data) override;
  TransportRequest recv(int peer, const FrameHeader& expected, void* data) override;
  bool receives_from_any_source() const override { return true; }
  bool wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) override;
  int ask_waiting_on(int peer) override { return control_->ask_waiting_on(peer); }
  int awaited_rank() override;
  void abort(const std::string& reason, bool timed_out = false) override;
  void quiesce() override;
  TransportFailure failure() override;
  void notify(uint32_t about, const std::string& text) override { control_->notify(about, text); }
  std::vector<PeerNotice> take_notices() override { return control_->take_notices(); }

 private:
  struct Operation;
  using OperationPtr = std::shared_ptr<Operation>;
  struct Peer;
  // One UCX request of a message and what it moves: the header, the payload, a goodbye.
  enum class Part : uint64_t { kHeader = 0, kPayload = 1, kGoodbye = 2 };
  struct InFlight {
    OperationPtr op;  // null for a goodbye
    Part part;
    bool sending;
    int peer;       // kAnySource for the header of a receive from any source
    void* request;  // UCX's
  };

  TransportRequest post_recv_any(std::vector<int> sources, const FrameHeader& expected, void* data) override;

  void exchange_addresses(Deadline deadline);
  // With mutex_ held: starts a UCX send or receive of one part; an immediate completion or
  // error is handled at once.
  void start_send(const OperationPtr& op, Part part, const void* buffer, size_t bytes);
  void start_recv(const OperationPtr& op, Part part, int peer, void* buffer, size_t bytes);
  void start_goodbye_recv(Peer& peer);
  // With mutex_ held: what a finished UCX request means.
  // `sender`: the rank the message came from (a receive's), else done.peer.
  void finished(const InFlight& done, ucs_status_t status, size_t bytes, int sender);
  void complete(Operation& op);
  // Whether a protected receive's tag is right (its payload, in op.sealed, decrypted with
  // kAead); touches nothing shared, so a waiter checks without mutex_.
  bool authentic(Operation& op) const;
  std::string integrity_failure(const Operation& op) const;
  static WireSecurity security_of(const std::vector<std::vector<Link>>& control_links);
  static std::vector<std::pair<std::string, std::string>> keys_of(const std::vector<std::vector<Link>>& control_links);
  void endpoint_lost(Peer& peer, ucs_status_t status);
  bool reap_locked();  // finished requests leave in_flight_; true if any did
  // With mutex_ held: the first failure sticks (told to the peers by the caller, unlocked).
  bool fail_locked(const std::string& reason, bool timed_out);
  void fail(const std::string& reason, bool timed_out);
  // With mutex_ held: whether peer `p` said goodbye having sent fewer messages than this rank
  // has posted receives for: then some receive can never be matched.
  bool outlived_by_receives(const Peer& peer) const;
  // With mutex_ held: why a pending receive from any source can never be matched (every rank it
  // takes messages from said goodbye, and its messages are all taken); empty while none is.
  std::string sources_gone_locked();
  // With mutex_ held, after a failure: cancels every request and closes every endpoint, until
  // no posted buffer will be touched again.
  void quiesce_locked(std::unique_lock<std::mutex>& lock);
  // With mutex_ held: closes every endpoint (force: at once, failing what is in flight on it;
  // else once what was sent has reached the peer), then drives the worker until the closes
  // are done and busy() is false, or until `give_up`.
  template <typename Busy>
  void close_endpoints(std::unique_lock<std::mutex>& lock, bool force, Deadline give_up, Busy busy);
  void progress_loop();
  void say_goodbye();
  void release_ucx();  // with no progress thread running: every request, endpoint, the worker
  void wake() { poller_.wake(); }
  static void endpoint_failed(void* arg, ucp_ep_h ep, ucs_status_t status);

  const int rank_;
  const int size_;
  const UcxLibrary& ucx_;
  const WireSecurity security_;  // the control links'
  // [peer]: its first control link's (sending, receiving) keys, from which each lane's derive.
  const std::vector<std::pair<std::string, std::string>> link_keys_;
  const size_t header_bytes_;    // a header's UCX message: the header, and its tag where protected
  std::unique_ptr<TcpTransport> control_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int worker_fd_ = -1;  // UCX's, armed before the progress thread sleeps on it
  Poller poller_;       // the worker's descriptor; posts and aborts wake the progress thread
  std::vector<std::unique_ptr<Peer>> peers_;  // [rank]; null for this rank

  // Guards every UCX call (the worker is UCS_THREAD_MODE_SERIALIZED) and the state below.
  std::mutex mutex_;
  std::mutex sealing_mutex_;  // taken before mutex_: a send's sealing and posting, in lane order
  std::condition_variable completed_;
  std::vector<InFlight> in_flight_;
  bool failed_ = false;
  bool failure_timed_out_ = false;
  bool failure_told_ = false;  // the control links carried it to the peers
  bool quiesced_ = false;      // after a failure: no posted buffer will be touched again
  bool stopping_ = false;
  std::string failure_;
  std::thread progress_thread_;
};

}  // namespace collectives
