// TCP transport: one progress thread per communicator drives every socket through epoll
// (no busy polling). Callers post sends and receives, which complete asynchronously; a
// socket sends and receives different messages at once (full duplex), and several sockets
// per peer can share a peer's traffic.
//
// Messages on one socket are matched in order: the n-th receive posted for a socket takes the
// n-th frame that arrives on it, and its header must be the one expected. A frame that arrives
// before its receive is posted stays parked in the kernel (the socket is not read further), so
// payloads go straight into the posted buffer and a fast sender is held back by TCP itself.
//
// Small messages pass no thread on their way: a send is written from the posting thread when
// its socket has nothing queued, and a thread that waits on a small receive reads its socket
// itself (the progress thread stops polling that socket for reading meanwhile), so a message's
// arrival wakes one thread, the one that wants it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/file_descriptor.h"
#include "transport/frame.h"
#include "transport/frame_io.h"
#include "transport/socket.h"
#include "transport/transport.h"
#include "transport/wire_security.h"

namespace collectives {

class TcpTransport : public Transport {
 public:
  // peer_links[p]: connected, authenticated sockets to rank p (empty for this rank); the
  // transport owns them from here on. peer_names[p] names rank p in error messages.
  TcpTransport(int rank, int size, std::vector<std::vector<Link>> peer_links,
               std::vector<std::string> peer_names);
  ~TcpTransport() override;
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& peer_name(int peer) const override { return peer_names_[peer]; }

  // The message goes on connection (header.unit % connections to that peer), so that both
  // ends agree on which socket carries it.
  TransportRequest send(int peer, const FrameHeader& header, const void* data) override;
  TransportRequest recv(int peer, const FrameHeader& expected, void* data) override;
  bool receives_from_any_source() const override { return true; }
  void offer_waiting_frames(const std::shared_ptr<PostedOperation>& op) override;

  bool wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) override;
  int ask_waiting_on(int peer) override;
  int awaited_rank() override;

  // Peers are told by an abort frame where a socket is between frames, then shutdown.
  void abort(const std::string& reason, bool timed_out = false) override;
  // After abort(): blocks until no socket or posted buffer will be touched again.
  void quiesce() override;
  TransportFailure failure() override;

  // A notice travels behind the earlier messages on its connection: so a notice sent before
  // any message of a collective reaches a peer that is still inside that collective, or
  // waiting elsewhere.
  void notify(uint32_t about, const std::string& text) override;
  std::vector<PeerNotice> take_notices() override;

 private:
  using Operation = PostedOperation;
  using OperationPtr = std::shared_ptr<Operation>;
  struct Connection;
  OperationPtr post(int peer, const FrameHeader& header, void* data, bool is_send);
  void submit(const OperationPtr& op);
  void progress_loop();
  void handle_readable(Connection& conn);
  // A header is in: hand its payload a place (false: parked, or the transport failed).
  bool take_header(Connection& conn);
  // A frame is in: check it and complete its receive (false: reading stops here).
  bool take_frame(Connection& conn);
  // Write queued frames until the socket is full; true when nothing is left to write.
  bool handle_writable(Connection& conn);
  bool write_queued(Connection& conn);  // the same, with conn.write_mutex held
  // Reads the socket of a small receive from this thread until it completes, the transport
  // fails or `until` comes; false where another thread reads that socket.
  bool receive_inline(Operation& op, Clock::time_point until);
  void read_if_free(Connection& conn);  // the progress thread's, unless another thread reads it now
  // A caller's: reads what the socket has, unless another thread reads it now (false).
  bool read_now(Connection& conn);
  // Releases the socket's reading, waking the progress thread if it came for it meanwhile.
  void let_go(Connection& conn, std::unique_lock<std::mutex> reading);
  void update_interest(Connection& conn);
  void set_read_by_caller(Connection& conn, bool by_caller);
  // The socket that carries message `unit` to or from `peer` (both ends pick the same one).
  Connection& connection_of(int peer, uint32_t unit);
  void fail(const std::string& reason, bool timed_out);
  void notify_peers_of_failure();
  void say_goodbye();
  void peer_closed(Connection& conn);
  void complete(Operation& op);
  // With mutex_ held: completes `op` (numbered) with the oldest frame stashed for its
  // communicator; why it does not match, if it does not.
  std::string take_stashed(Connection& conn, Operation& op);
  void wake();
  bool has_failed();

  const int rank_;
  const int size_;
  const std::vector<std::string> peer_names_;
  std::vector<std::vector<std::unique_ptr<Connection>>> connections_;  // [peer][index]

  Poller poller_;  // posts and aborts wake the progress thread
  Latch failed_latch_;  // raised on failure: wakes threads that read a socket themselves

  std::mutex mutex_;  // guards queues, completion flags and the failure fields below
  std::condition_variable completed_;
  bool failed_ = false;
  bool failure_timed_out_ = false;
  // Set once, after a failure, when the progress thread has told the peers and will never
  // touch a socket or a posted buffer again: only then may a failed wait() return, since the
  // caller may free its buffers as soon as it does.
  bool quiesced_ = false;
  bool stopping_ = false;
  std::string failure_;
  std::vector<PeerNotice> notices_;
  std::vector<int> waiting_on_;  // [peer]: its answer to our last kStalled; kNoAnswer before one

  std::thread progress_thread_;
};

}  // namespace collectives
