#include "transport/tcp_transport.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <stdexcept>
#include <utility>

#include "transport/matching.h"
#include "transport/socket.h"

namespace collectives {

struct TcpTransport::Connection {
  Connection(const Link& link, int peer)
      : fd(link.fd), peer(peer), writer(sending_protection(link)), reader(receiving_protection(link)) {}
  FileDescriptor fd;
  int peer = 0;
  std::deque<OperationPtr> sends;  // guarded by mutex_
  // Guarded by mutex_: receives by communicator (FrameHeader::comm), each in posting order,
  // and the frames read ahead for a communicator that had none posted (see take_header).
  std::map<uint64_t, std::deque<OperationPtr>> recvs;
  std::map<uint64_t, std::deque<StashedFrame>> stashed;
  bool peer_closed = false;  // guarded by mutex_: the peer said goodbye

  // Writes come from the progress thread, or straight from the posting thread when the
  // socket has nothing queued (saving a hand-off per message); this mutex makes them take
  // turns. Taken before mutex_ where both are held.
  std::mutex write_mutex;
  OperationPtr sending;  // guarded by write_mutex: the frame being written
  FrameWriter writer;        // guarded by write_mutex

  // Reading is the progress thread's, or a waiting caller's (receive_inline): whoever holds
  // read_mutex. Taken before write_mutex and mutex_ where they are held too.
  std::mutex read_mutex;
  FrameReader reader;      // guarded by read_mutex
  OperationPtr receiving;  // guarded by read_mutex; null while a control frame (goodbye, abort) is read
  // Guarded by read_mutex: where payloads wait for their check when the link protects frames:
  // a receive's buffer gets them only once they are known to be authentic. Also an abort's reason.
  std::vector<char> staging;
  // Written with read_mutex held, read by update_interest from any thread.
  std::atomic<bool> parked{false};  // the reader holds a header, waiting for a receive to be posted
  bool stashing = false;  // guarded by read_mutex: the frame being read goes to `stashed`
  std::atomic<bool> closed{false};  // no longer polled: after a failure, or the peer's goodbye
  // The progress thread found the socket read by a caller: the caller wakes it when it lets go.
  std::atomic<bool> missed_by_progress{false};

  // What epoll watches, decided from the fields above and the queued sends under this mutex
  // alone, so that two threads cannot leave a stale choice behind. Taken before write_mutex.
  std::mutex interest_mutex;
  uint32_t interest = 0;        // events registered with epoll; 0 = not registered
  bool read_by_caller = false;  // a waiting caller reads the socket: not polled for reading
};

namespace {

// Bytes moved on one socket before the loop turns to the others, so one busy peer cannot
// starve the rest.
constexpr uint64_t kFairnessBudget = 4 << 20;
// Receives of up to this many bytes are read by the waiting thread itself (receive_inline).
// Larger ones are left to the progress thread, whose reads of many sockets are what the
// ring's pipelining was tuned with.
constexpr uint64_t kInlineReceiveBytes = 64 << 10;
// How long a closing rank waits for room in a socket's buffer to say goodbye (its peer may
// still be draining the last collective's data), and a failing rank to say why.
constexpr int kGoodbyeMillis = 10000;
constexpr int kAbortNoticeMillis = 1000;

}  // namespace

TcpTransport::TcpTransport(int rank, int size, std::vector<std::vector<Link>> peer_links,
                           std::vector<std::string> peer_names)
    : rank_(rank), size_(size), peer_names_(std::move(peer_names)), waiting_on_(std::max(size, 0), kNoAnswer) {
  // Own every socket first, so that each is closed whatever fails below.
  connections_.resize(peer_links.size());
  for (size_t peer = 0; peer < peer_links.size(); ++peer) {
    for (const Link& link : peer_links[peer]) {
      connections_[peer].push_back(std::make_unique<Connection>(link, static_cast<int>(peer)));
    }
  }
  if (size < 1 || rank < 0 || rank >= size) throw std::invalid_argument("rank out of range");
  if (static_cast<int>(peer_links.size()) != size || static_cast<int>(peer_names_.size()) != size) {
    throw std::invalid_argument("need one list of sockets and one name per rank");
  }
  for (int peer = 0; peer < size; ++peer) {
    if (peer != rank && connections_[peer].empty()) {
      throw std::invalid_argument("no connection to " + peer_names_[peer]);
    }
    for (auto& conn : connections_[peer]) {
      set_nonblocking(conn->fd.get());
      update_interest(*conn);
    }
  }
  progress_thread_ = std::thread([this] { progress_loop(); });
}

TcpTransport::~TcpTransport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake();
  progress_thread_.join();
  say_goodbye();
}

void TcpTransport::wake() { poller_.wake(); }

TransportRequest TcpTransport::send(int peer, const FrameHeader& header, const void* data) {
  return post(peer, header, const_cast<void*>(data), /*is_send=*/true);
}

TransportRequest TcpTransport::recv(int peer, const FrameHeader& expected, void* data) {
  return post(peer, expected, data, /*is_send=*/false);
}

TcpTransport::OperationPtr TcpTransport::post(int peer, const FrameHeader& header, void* data,
                                              bool is_send) {
  auto op = std::make_shared<Operation>();
  op->peer = peer;
  op->is_send = is_send;
  op->header = header;
  op->data = static_cast<char*>(data);
  if (!is_send) op->order = matching().next_order();
  submit(op);
  return op;
}

void TcpTransport::notify(uint32_t about, const std::string& text) {
  for (int peer = 0; peer < size_; ++peer) {
    if (peer != rank_) submit(Operation::notice(peer, about, text));
  }
}

std::vector<PeerNotice> TcpTransport::take_notices() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(notices_, {});
}

void TcpTransport::submit(const OperationPtr& op) {
  const int peer = op->peer;
  const bool is_send = op->is_send;
  Connection& conn = connection_of(op->peer, op->header.unit);
  bool was_idle = false, rejected = false, peer_gone = false, from_stash = false;
  std::string refused;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& queue = is_send ? conn.sends : conn.recvs[uint64_t{op->header.comm}];
    rejected = failed_ || (conn.peer_closed && (is_send || conn.stashed[uint64_t{op->header.comm}].empty()));
    if (rejected) {
      op->done = true;  // not ok: wait() reports the failure
      peer_gone = !failed_;
    } else if (!is_send && !conn.stashed[uint64_t{op->header.comm}].empty()) {
      from_stash = true;
      matching().number(peer, op->header);
      refused = take_stashed(conn, *op);
    } else {
      was_idle = queue.empty();
      queue.push_back(op);
    }
  }
  if (!refused.empty()) fail(refused, false);
  if (from_stash) return;
  if (peer_gone) abort(peer_has_closed(peer_names_[peer]));
  if (rejected || !was_idle) return;  // a busy socket's next readiness event finds it
  if (is_send) {
    // Nothing queued before this frame: write it now, from this thread. Whatever the socket
    // does not take at once is left to the progress thread.
    std::unique_lock<std::mutex> writing(conn.write_mutex, std::try_to_lock);
    if (writing.owns_lock() && write_queued(conn)) return;
  } else if (!conn.parked) {
    return;  // the socket is polled for reading (or read by a waiting caller): the frame is read when it comes
  } else if (op->header.nbytes <= kInlineReceiveBytes && read_now(conn)) {
    return;  // the frame was here, parked: taken from this thread, as receive_inline would
  }
  // An idle socket has no EPOLLOUT interest, and a parked one waits for exactly this receive:
  // the progress thread must be told.
  wake();
}

bool TcpTransport::wait_until(const TransportRequest& posted, Deadline deadline, Clock::time_point until) {
  if (posted->from_any_source()) return wait_any_until(posted, deadline, until);
  // Every request waited on here was made by post().
  Operation* request = static_cast<Operation*>(posted.get());
  if (!request->is_send && request->header.nbytes <= kInlineReceiveBytes) {
    receive_inline(*request, std::min(deadline, until));
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (!await(lock, completed_, *request, deadline, until, [&] { return request->done || failed_; })) return false;
  // A request that completed stays good even if the transport failed afterwards.
  if (request->ok) return true;
  completed_.wait(lock, [&] { return quiesced_; });  // the caller may free buffers next
  TransportFailure{failure_, failure_timed_out_}.raise();
}

TcpTransport::Connection& TcpTransport::connection_of(int peer, uint32_t unit) {
  auto& conns = connections_.at(peer);
  return *conns[unit % conns.size()];
}

bool TcpTransport::receive_inline(Operation& op, Clock::time_point until) {
  auto finished = [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    return op.done || failed_;
  };
  if (finished()) return true;
  Connection& conn = connection_of(op.peer, op.header.unit);
  std::unique_lock<std::mutex> reading(conn.read_mutex, std::try_to_lock);
  if (!reading.owns_lock() || conn.closed) return false;
  set_read_by_caller(conn, true);
  while (!finished() && !conn.closed) {
    handle_readable(conn);
    if (finished() || conn.closed) break;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) break;
    pollfd ready[2] = {{conn.fd.get(), POLLIN, 0}, {failed_latch_.fd(), POLLIN, 0}};
    if (::poll(ready, 2, static_cast<int>(std::min<int64_t>(left, 1000))) < 0 && errno != EINTR) break;
  }
  set_read_by_caller(conn, false);
  let_go(conn, std::move(reading));
  return finished();
}

bool TcpTransport::read_now(Connection& conn) {
  std::unique_lock<std::mutex> reading(conn.read_mutex, std::try_to_lock);
  if (!reading.owns_lock()) return false;
  if (!conn.closed) handle_readable(conn);
  update_interest(conn);  // no longer parked, perhaps: polled for reading again
  let_go(conn, std::move(reading));
  return true;
}

void TcpTransport::let_go(Connection& conn, std::unique_lock<std::mutex> reading) {
  reading.unlock();
  // The progress thread came for this socket meanwhile (a receive posted for a header that is
  // parked now, say): it tries again.
  if (conn.missed_by_progress.exchange(false)) wake();
}

void TcpTransport::read_if_free(Connection& conn) {
  // Said before trying, so that a caller letting go after the try fails cannot miss it.
  conn.missed_by_progress = true;
  std::unique_lock<std::mutex> reading(conn.read_mutex, std::try_to_lock);
  if (!reading.owns_lock()) return;
  conn.missed_by_progress = false;
  if (!conn.closed) handle_readable(conn);
}

int TcpTransport::ask_waiting_on(int peer) {
  std::unique_lock<std::mutex> lock(mutex_);
  waiting_on_[peer] = kNoAnswer;
  lock.unlock();
  FrameHeader question;
  question.kind = static_cast<uint8_t>(FrameKind::kStalled);
  post(peer, question, nullptr, /*is_send=*/true);
  lock.lock();
  completed_.wait_for(lock, std::chrono::duration<double>(kStalledGraceSeconds),
                      [&] { return failed_ || waiting_on_[peer] != kNoAnswer; });
  return failed_ ? kFailedMeanwhile : waiting_on_[peer];
}

void TcpTransport::abort(const std::string& reason, bool timed_out) {
  fail(reason, timed_out);
  wake();
}

void TcpTransport::quiesce() {
  std::unique_lock<std::mutex> lock(mutex_);
  completed_.wait(lock, [&] { return quiesced_; });
}

void TcpTransport::fail(const std::string& reason, bool timed_out) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return;
    failed_ = true;
    failure_timed_out_ = timed_out;
    failure_ = reason;
    completed_.notify_all();
  }
  failed_latch_.raise();
  matching().fail();
  failed_first(reason, timed_out);
  wake();  // the progress thread tells the peers, wherever the failure was seen
}

bool TcpTransport::has_failed() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failed_;
}

TransportFailure TcpTransport::failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failed_ ? TransportFailure{failure_, failure_timed_out_} : TransportFailure{};
}

std::string TcpTransport::take_stashed(Connection& conn, Operation& op) {
  const std::string why = collectives::take_stashed(conn.stashed[uint64_t{op.header.comm}], op);
  matching().finish(op, why.empty());
  completed_.notify_all();
  return why.empty() ? why : peer_names_[conn.peer] + " sent " + why;
}

void TcpTransport::complete(Operation& op) {
  std::lock_guard<std::mutex> lock(mutex_);
  matching().finish(op, true);
  completed_.notify_all();
}

void TcpTransport::offer_waiting_frames(const OperationPtr& op) {
  std::string refused;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return;
    for (int peer : op->sources) {
      if (connections_.at(peer).empty()) continue;  // not this transport's (a routing transport's other part)
      Connection& conn = connection_of(peer, op->header.unit);
      if (conn.stashed[uint64_t{op->header.comm}].empty() || !matching().claim(*op, peer)) continue;
      refused = take_stashed(conn, *op);
      break;
    }
  }
  if (!refused.empty()) fail(refused, false);
  wake();  // a parked frame may be the one it waits for
}

void TcpTransport::progress_loop() {
  epoll_event events[64];
  for (;;) {
    bool stopping, failed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping = stopping_;
      failed = failed_;
    }
    if (failed) {
      notify_peers_of_failure();
      return;
    }
    if (stopping) return;
    bool woken;
    int n = poller_.wait(events, 64, -1, &woken);
    if (n < 0) {
      if (errno != EINTR) fail("epoll_wait failed: " + errno_text(errno), false);
      continue;
    }
    for (int i = 0; i < n && !has_failed(); ++i) {
      auto* conn = static_cast<Connection*>(events[i].data.ptr);
      if (conn->closed) continue;
      if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) read_if_free(*conn);
      if (!conn->closed && (events[i].events & EPOLLOUT)) handle_writable(*conn);
    }
    if (has_failed()) continue;
    // New sends and receives were posted: start them now rather than on the next readiness
    // event, which for an idle socket would never come.
    for (auto& peer : connections_) {
      for (auto& conn : peer) {
        if (conn->closed) continue;
        if (woken) {
          handle_writable(*conn);
          if (conn->parked) read_if_free(*conn);
        }
        update_interest(*conn);
      }
    }
  }
}

void TcpTransport::update_interest(Connection& conn) {
  std::lock_guard<std::mutex> deciding(conn.interest_mutex);
  bool want_write;
  {
    std::lock_guard<std::mutex> writing(conn.write_mutex);
    std::lock_guard<std::mutex> lock(mutex_);
    want_write = conn.sending != nullptr || !conn.sends.empty();
  }
  // A parked socket is not polled for reading: its next bytes belong to a receive not yet
  // posted, and a hang-up reported meanwhile would wake the loop for nothing, forever. It is
  // read again (and a dead peer noticed) once that receive is posted. One that a caller reads
  // is not polled for reading either: its data should wake that caller alone.
  const bool want_read = !conn.parked && !conn.read_by_caller;
  const uint32_t interest =
      conn.closed ? 0u : (want_read ? uint32_t{EPOLLIN} : 0u) | (want_write ? uint32_t{EPOLLOUT} : 0u);
  conn.interest = poller_.watch(conn.fd.get(), conn.interest, interest, &conn);
}

void TcpTransport::set_read_by_caller(Connection& conn, bool by_caller) {
  {
    std::lock_guard<std::mutex> deciding(conn.interest_mutex);
    conn.read_by_caller = by_caller;
  }
  update_interest(conn);
}

void TcpTransport::handle_readable(Connection& conn) {
  const std::string& who = peer_names_[conn.peer];
  // A parked header goes on once its receive is posted.
  if (conn.parked && !take_header(conn)) return;
  uint64_t budget = kFairnessBudget;
  while (budget > 0) {
    ssize_t got = ::recv(conn.fd.get(), conn.reader.next(), conn.reader.wanted(budget), 0);
    if (got == 0) return fail(peer_exited(who), false);
    if (got < 0) {
      if (would_block(errno)) return;
      return fail("connection to " + who + " failed: " + errno_text(errno), false);
    }
    budget -= std::min<uint64_t>(budget, got);
    switch (conn.reader.advance(got)) {
      case FrameReader::Event::kNone: break;
      case FrameReader::Event::kHeader:
        if (!take_header(conn)) return;
        break;
      case FrameReader::Event::kFrame:
        if (!take_frame(conn)) return;
        break;
    }
  }
}

bool TcpTransport::take_header(Connection& conn) {
  const std::string& who = peer_names_[conn.peer];
  const FrameHeader& h = conn.reader.header();
  const bool control = h.magic == kFrameMagic && (h.kind == static_cast<uint8_t>(FrameKind::kGoodbye) ||
                                                  h.kind == static_cast<uint8_t>(FrameKind::kAbort) ||
                                                  h.kind == static_cast<uint8_t>(FrameKind::kNotice) ||
                                                  h.kind == static_cast<uint8_t>(FrameKind::kStalled) ||
                                                  h.kind == static_cast<uint8_t>(FrameKind::kWaitingOn));
  char* into;
  if (control) {
    if (h.nbytes > kMaxAbortReason) {
      fail(who + " sent a control frame of " + std::to_string(h.nbytes) + " bytes", false);
      return false;
    }
    conn.receiving.reset();
    conn.staging.resize(h.nbytes);
    into = conn.staging.data();
  } else {
    {
      /*
       * A frame goes straight into the receive posted for its communicator. With none posted
       * it stays parked in the kernel (TCP holds the sender back), unless another
       * communicator waits for a frame behind it on this connection: then it is read whole
       * into memory (stashed) for its receive to take later, since the ranks may run the
       * collectives of different communicators in different orders. Frames of a
       * communicator with some stashed are stashed too, to stay in order.
       */
      std::lock_guard<std::mutex> lock(mutex_);
      if (failed_) return false;  // posted buffers may be handed back from here on
      conn.receiving = place_frame(h, conn.peer, conn.recvs, conn.stashed, matching(), &conn.stashing);
      conn.parked = !conn.stashing && !conn.receiving;
    }
    if (conn.parked) return false;
    if (conn.stashing) {
      std::string refused;
      conn.staging = read_ahead_buffer(who, h, &refused);
      if (!refused.empty()) {
        fail(refused + (conn.reader.checks() ? kUncheckedHeader : ""), false);
        return false;
      }
      return !conn.reader.read_payload_into(conn.staging.data()) || take_frame(conn);
    }
    std::string why = mismatch(conn.receiving->header, h);
    if (!why.empty()) {
      if (conn.reader.checks()) why += kUncheckedHeader;
      fail(who + " sent " + why, false);
      return false;
    }
    if (conn.reader.checks()) conn.staging.resize(h.nbytes);
    into = conn.reader.checks() ? conn.staging.data() : conn.receiving->data;
  }
  return !conn.reader.read_payload_into(into) || take_frame(conn);
}

bool TcpTransport::take_frame(Connection& conn) {
  const std::string& who = peer_names_[conn.peer];
  if (!conn.reader.authentic()) {
    fail(who + " sent a frame that failed its integrity check (COLLECTIVES_WIRE_SECURITY=" +
             to_string(conn.reader.security()) + "): it was altered on the way, or injected by someone "
             "other than " + who, false);
    return false;
  }
  const FrameHeader h = conn.reader.header();
  conn.reader.next_frame();
  if (h.kind == static_cast<uint8_t>(FrameKind::kGoodbye)) {
    peer_closed(conn);
    return false;
  }
  if (h.kind == static_cast<uint8_t>(FrameKind::kAbort)) {
    // The abort's op field says whether the peer gave up on a deadline.
    fail(who + " aborted: " + std::string(conn.staging.begin(), conn.staging.end()), h.op == 1);
    return false;
  }
  if (h.kind == static_cast<uint8_t>(FrameKind::kNotice)) {
    std::lock_guard<std::mutex> lock(mutex_);
    notices_.push_back({conn.peer, h.unit, std::string(conn.staging.begin(), conn.staging.end())});
    return true;
  }
  if (h.kind == static_cast<uint8_t>(FrameKind::kStalled)) {
    FrameHeader answer;
    answer.kind = static_cast<uint8_t>(FrameKind::kWaitingOn);
    const int awaited = rank_waited_on();
    answer.root = awaited < 0 ? kWaitsForNobody : static_cast<uint32_t>(awaited);
    post(conn.peer, answer, nullptr, /*is_send=*/true);
    return true;
  }
  if (h.kind == static_cast<uint8_t>(FrameKind::kWaitingOn)) {
    if (h.root != kWaitsForNobody && h.root >= static_cast<uint32_t>(size_)) {
      fail(who + " said it waits on rank " + std::to_string(h.root) + ", which does not exist", false);
      return false;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    waiting_on_[conn.peer] = h.root == kWaitsForNobody ? kNobody : static_cast<int>(h.root);
    completed_.notify_all();
    return true;
  }
  if (conn.stashing) {
    conn.stashing = false;
    std::string refused;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      conn.stashed[uint64_t{h.comm}].push_back({h, std::move(conn.staging)});
      conn.staging.clear();
      // A receive posted while the frame was read, for its sender or from any source.
      if (OperationPtr op = matching().take(conn.peer, uint64_t{h.comm}, conn.recvs[uint64_t{h.comm}])) {
        refused = take_stashed(conn, *op);
      }
    }
    if (!refused.empty()) fail(refused, false);
    return refused.empty();
  }
  OperationPtr done = std::move(conn.receiving);
  conn.receiving.reset();
  if (conn.reader.checks() && h.nbytes > 0) std::memcpy(done->data, conn.staging.data(), h.nbytes);
  complete(*done);
  return true;
}

int TcpTransport::awaited_rank() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& peer : connections_) {
    for (auto& conn : peer) {
      if (!conn->closed && (conn->receiving || any_waiting(conn->recvs))) return conn->peer;
    }
  }
  return matching().awaited_rank();
}

bool TcpTransport::handle_writable(Connection& conn) {
  std::lock_guard<std::mutex> writing(conn.write_mutex);
  return write_queued(conn);
}

bool TcpTransport::write_queued(Connection& conn) {
  const std::string& who = peer_names_[conn.peer];
  uint64_t budget = kFairnessBudget;
  while (budget > 0) {
    if (!conn.sending) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (failed_) return false;
      if (conn.sends.empty()) return true;
      conn.sending = conn.sends.front();
      conn.sends.pop_front();
      conn.writer.start(conn.sending->header, conn.sending->data);
    }
    ssize_t sent = conn.writer.write_some(conn.fd.get(), budget);
    if (sent < 0) fail("connection to " + who + " failed: " + errno_text(errno), false);
    if (sent <= 0) return false;
    budget -= std::min<uint64_t>(budget, sent);
    if (conn.writer.done()) {
      OperationPtr done = std::move(conn.sending);
      conn.sending.reset();
      complete(*done);
    }
  }
  return false;
}

void TcpTransport::peer_closed(Connection& conn) {
  // The peer sends nothing after its goodbye: stop polling, so the end of stream (or a reset
  // once it closes) that follows is not taken for a failure.
  conn.closed = true;
  update_interest(conn);
  bool owed, gone;
  {
    std::lock_guard<std::mutex> writing(conn.write_mutex);
    std::lock_guard<std::mutex> lock(mutex_);
    conn.peer_closed = true;
    owed = any_waiting(conn.recvs) || !conn.sends.empty() || conn.sending != nullptr;
    const auto& all = connections_[conn.peer];
    gone = std::all_of(all.begin(), all.end(), [](const auto& c) { return c->peer_closed; });
  }
  if (owed) {
    fail(peer_closed_mid_exchange(peer_names_[conn.peer]), false);
  } else if (gone) {
    source_gone(conn.peer);
  }
}

void TcpTransport::say_goodbye() {
  // The progress thread has stopped. Nothing is in flight: a collective returns only when its
  // sends are in the kernel, so the goodbye follows the last frame on each socket.
  if (quiesced_) return;  // failed: the peers were told why instead
  FrameHeader goodbye;
  goodbye.kind = static_cast<uint8_t>(FrameKind::kGoodbye);
  for (auto& peer : connections_) {
    for (auto& conn : peer) {
      if (conn->closed) continue;
      write_frame(conn->fd.get(), conn->writer, goodbye, "", deadline_after(kGoodbyeMillis / 1000.0));
      shutdown(conn->fd.get(), SHUT_WR);
    }
  }
}

void TcpTransport::notify_peers_of_failure() {
  std::string reason;
  bool timed_out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    reason = failure_;
    timed_out = failure_timed_out_;
  }
  // Peers hear "rank R aborted: <reason>" (they name the sender), so every rank's error
  // names the first cause.
  const std::string text = reason.substr(0, kMaxAbortReason);
  FrameHeader abort_header;
  abort_header.kind = static_cast<uint8_t>(FrameKind::kAbort);
  abort_header.op = timed_out ? 1 : 0;
  abort_header.nbytes = text.size();
  for (auto& peer : connections_) {
    for (auto& conn : peer) {
      if (conn->closed) continue;
      // A caller that reads this socket sees the failure and lets go within a read.
      std::lock_guard<std::mutex> reading(conn->read_mutex);
      {
        std::lock_guard<std::mutex> writing(conn->write_mutex);
        // A frame half-written cannot be interrupted; that peer sees the shutdown instead.
        if (!conn->writer.mid_frame()) {
          if (conn->writer.busy()) conn->writer.discard();
          write_frame(conn->fd.get(), conn->writer, abort_header, text, deadline_after(kAbortNoticeMillis / 1000.0));
        }
        shutdown(conn->fd.get(), SHUT_RDWR);
        conn->sending.reset();
      }
      conn->closed = true;
      update_interest(*conn);
      conn->receiving.reset();
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  quiesced_ = true;
  completed_.notify_all();
}

}  // namespace collectives
