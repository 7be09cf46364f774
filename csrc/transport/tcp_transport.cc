#include "transport/tcp_transport.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <stdexcept>

namespace collectives {

struct TransportOperation {
  int peer = 0;
  bool is_send = false;
  FrameHeader header;    // the header to send, or the one expected
  char* data = nullptr;  // payload (header.nbytes bytes)
  uint64_t transferred = 0;  // header + payload bytes moved so far (progress thread only)
  bool done = false;         // guarded by the transport's mutex
  std::vector<char> owned;   // payload storage for frames the transport makes itself
};

struct TcpTransport::Connection {
  int fd = -1;
  int peer = 0;
  std::deque<TransportRequest> sends;  // guarded by mutex_
  std::deque<TransportRequest> recvs;  // guarded by mutex_

  // Progress thread only:
  TransportRequest sending;
  TransportRequest receiving;
  FrameHeader incoming;
  size_t incoming_header_bytes = 0;
  bool parked = false;  // a header is in `incoming`, waiting for a receive to be posted
  uint32_t interest = 0;
  bool closed = false;       // no longer polled: after a failure, or the peer's goodbye
  bool peer_closed = false;  // guarded by mutex_: the peer said goodbye
};

namespace {

constexpr size_t kHeaderBytes = sizeof(FrameHeader);
// Bytes moved on one socket before the loop turns to the others, so one busy peer cannot
// starve the rest.
constexpr uint64_t kFairnessBudget = 4 << 20;

std::string errno_text(int err) { return std::strerror(err); }

void set_nonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    throw std::runtime_error("fcntl(O_NONBLOCK) failed: " + errno_text(errno));
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

TcpTransport::TcpTransport(int rank, int size, std::vector<std::vector<int>> peer_fds,
                           std::vector<std::string> peer_names)
    : rank_(rank), size_(size), peer_names_(std::move(peer_names)) {
  if (size < 1 || rank < 0 || rank >= size) throw std::invalid_argument("rank out of range");
  if (static_cast<int>(peer_fds.size()) != size || static_cast<int>(peer_names_.size()) != size) {
    throw std::invalid_argument("need one list of sockets and one name per rank");
  }
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || wake_fd_ < 0) throw std::runtime_error("epoll/eventfd: " + errno_text(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;  // the wake-up eventfd
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);

  connections_.resize(size);
  for (int peer = 0; peer < size; ++peer) {
    if (peer == rank) continue;
    if (peer_fds[peer].empty()) {
      throw std::invalid_argument("no connection to " + peer_names_[peer]);
    }
    for (int fd : peer_fds[peer]) {
      auto conn = std::make_unique<Connection>();
      conn->fd = fd;
      conn->peer = peer;
      set_nonblocking(fd);
      conn->interest = EPOLLIN;
      epoll_event cev{};
      cev.events = conn->interest;
      cev.data.ptr = conn.get();
      if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &cev) < 0) {
        throw std::runtime_error("epoll_ctl: " + errno_text(errno));
      }
      connections_[peer].push_back(std::move(conn));
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
  for (auto& peer : connections_) {
    for (auto& conn : peer) close(conn->fd);
  }
  close(wake_fd_);
  close(epoll_fd_);
}

void TcpTransport::wake() {
  uint64_t one = 1;
  // A full eventfd counter already means "wake up"; nothing is lost if this write fails.
  [[maybe_unused]] ssize_t ignored = write(wake_fd_, &one, sizeof(one));
}

TransportRequest TcpTransport::send(int peer, const FrameHeader& header, const void* data) {
  return post(peer, header, const_cast<void*>(data), /*is_send=*/true);
}

TransportRequest TcpTransport::recv(int peer, const FrameHeader& expected, void* data) {
  return post(peer, expected, data, /*is_send=*/false);
}

TransportRequest TcpTransport::post(int peer, const FrameHeader& header, void* data,
                                    bool is_send) {
  auto op = std::make_shared<TransportOperation>();
  op->peer = peer;
  op->is_send = is_send;
  op->header = header;
  op->data = static_cast<char*>(data);
  auto& conns = connections_.at(peer);
  Connection& conn = *conns[header.unit % conns.size()];
  auto& queue = is_send ? conn.sends : conn.recvs;
  bool was_idle;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (conn.peer_closed && !failed_) {
      failed_ = true;
      failure_ = peer_names_[peer] + " has closed its communicator";
      completed_.notify_all();
    }
    if (failed_) {
      op->done = true;  // wait() reports the failure
      return op;
    }
    was_idle = queue.empty();
    queue.push_back(op);
  }
  // An idle socket has no EPOLLOUT interest, and a parked one waits for exactly this receive:
  // the progress thread must be told. Otherwise the next readiness event finds the request.
  if (was_idle) wake();
  return op;
}

void TcpTransport::wait(const TransportRequest& request, Deadline deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!request->done && !failed_) {
    if (completed_.wait_until(lock, deadline) == std::cv_status::timeout && !request->done &&
        !failed_) {
      const FrameHeader& h = request->header;
      std::string message = "message " + std::to_string(h.unit) + " (" +
                            std::to_string(h.nbytes) + " bytes)";
      std::string reason = request->is_send
                               ? "timed out sending " + message + " to " + peer_names_[request->peer]
                               : "timed out waiting for " + peer_names_[request->peer] +
                                     " to send " + message;
      lock.unlock();
      abort(reason, true);
      lock.lock();
      break;
    }
  }
  if (request->done && !failed_) return;
  throw_failure();
}

void TcpTransport::throw_failure() {
  // Called with mutex_ held and failed_ set.
  if (failure_timed_out_) throw TimeoutError(failure_);
  throw CollectiveError(failure_);
}

void TcpTransport::abort(const std::string& reason, bool timed_out) {
  fail(reason, timed_out);
  wake();
}

void TcpTransport::fail(const std::string& reason, bool timed_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (failed_) return;
  failed_ = true;
  failure_timed_out_ = timed_out;
  failure_ = reason;
  completed_.notify_all();
}

void TcpTransport::complete(TransportOperation& op) {
  std::lock_guard<std::mutex> lock(mutex_);
  op.done = true;
  completed_.notify_all();
}

void TcpTransport::progress_loop() {
  epoll_event events[64];
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
    }
    int n = epoll_wait(epoll_fd_, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("epoll_wait failed: " + errno_text(errno), false);
      return;
    }
    bool woken = false;
    for (int i = 0; i < n; ++i) {
      auto* conn = static_cast<Connection*>(events[i].data.ptr);
      if (conn == nullptr) {
        uint64_t count;
        [[maybe_unused]] ssize_t ignored = read(wake_fd_, &count, sizeof(count));
        woken = true;
        continue;
      }
      if (conn->closed) continue;
      if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) handle_readable(*conn);
      if (events[i].events & EPOLLOUT) handle_writable(*conn);
    }
    bool failed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      failed = failed_;
    }
    if (failed) {
      notify_peers_of_failure();
      continue;
    }
    // New sends and receives were posted: start them now rather than on the next readiness
    // event, which for an idle socket would never come.
    for (auto& peer : connections_) {
      for (auto& conn : peer) {
        if (conn->closed) continue;
        if (woken) {
          handle_writable(*conn);
          if (conn->parked) handle_readable(*conn);
        }
        update_interest(*conn);
      }
    }
  }
}

void TcpTransport::update_interest(Connection& conn) {
  bool want_write;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    want_write = conn.sending != nullptr || !conn.sends.empty();
  }
  uint32_t interest = (conn.parked ? 0u : uint32_t{EPOLLIN}) | (want_write ? uint32_t{EPOLLOUT} : 0u);
  if (interest == conn.interest) return;
  conn.interest = interest;
  epoll_event ev{};
  ev.events = interest;
  ev.data.ptr = &conn;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, conn.fd, &ev);
}

void TcpTransport::handle_readable(Connection& conn) {
  const std::string& who = peer_names_[conn.peer];
  uint64_t budget = kFairnessBudget;
  while (budget > 0) {
    if (!conn.receiving) {
      if (conn.incoming_header_bytes < kHeaderBytes) {
        ssize_t got = ::recv(conn.fd, reinterpret_cast<char*>(&conn.incoming) + conn.incoming_header_bytes,
                             kHeaderBytes - conn.incoming_header_bytes, 0);
        if (got == 0) return fail(who + " closed the connection (process exited or was killed?)", false);
        if (got < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
          return fail("connection to " + who + " failed: " + errno_text(errno), false);
        }
        conn.incoming_header_bytes += got;
        if (conn.incoming_header_bytes < kHeaderBytes) continue;
      }
      const FrameHeader& h = conn.incoming;
      if (h.magic == kFrameMagic && h.kind == static_cast<uint8_t>(FrameKind::kGoodbye)) {
        return peer_closed(conn);
      }
      if (h.magic == kFrameMagic && h.kind == static_cast<uint8_t>(FrameKind::kAbort)) {
        if (h.nbytes > kMaxAbortReason) {
          return fail(who + " sent an abort frame of " + std::to_string(h.nbytes) + " bytes", false);
        }
        auto op = std::make_shared<TransportOperation>();
        op->peer = conn.peer;
        op->header = h;
        op->owned.resize(h.nbytes);
        op->data = op->owned.data();
        conn.receiving = op;
      } else {
        {
          std::lock_guard<std::mutex> lock(mutex_);
          conn.parked = conn.recvs.empty();
          if (!conn.parked) {
            conn.receiving = conn.recvs.front();
            conn.recvs.pop_front();
          }
        }
        if (conn.parked) return;
        std::string why = mismatch(conn.receiving->header, h);
        if (!why.empty()) {
          return fail(who + " sent " + why, false);
        }
      }
    }
    TransportOperation& op = *conn.receiving;
    uint64_t want = op.header.nbytes - op.transferred;
    if (want > 0) {
      ssize_t got = ::recv(conn.fd, op.data + op.transferred, std::min(want, budget), 0);
      if (got == 0) return fail(who + " closed the connection (process exited or was killed?)", false);
      if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        return fail("connection to " + who + " failed: " + errno_text(errno), false);
      }
      op.transferred += got;
      budget -= std::min<uint64_t>(budget, got);
      if (op.transferred < op.header.nbytes) continue;
    }
    conn.incoming_header_bytes = 0;
    TransportRequest done = std::move(conn.receiving);
    conn.receiving.reset();
    if (done->header.kind == static_cast<uint8_t>(FrameKind::kAbort)) {
      // The abort's op field says whether the peer gave up on a deadline.
      return fail(who + " aborted: " + std::string(done->owned.begin(), done->owned.end()),
                  done->header.op == 1);
    }
    complete(*done);
  }
}

void TcpTransport::handle_writable(Connection& conn) {
  const std::string& who = peer_names_[conn.peer];
  uint64_t budget = kFairnessBudget;
  while (budget > 0) {
    if (!conn.sending) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (conn.sends.empty()) return;
      conn.sending = conn.sends.front();
      conn.sends.pop_front();
    }
    TransportOperation& op = *conn.sending;
    // Header and payload leave in one call while the header is not yet out.
    iovec iov[2];
    int iovcnt = 0;
    uint64_t total = kHeaderBytes + op.header.nbytes;
    if (op.transferred < kHeaderBytes) {
      iov[iovcnt++] = {reinterpret_cast<char*>(&op.header) + op.transferred,
                       kHeaderBytes - op.transferred};
    }
    uint64_t payload_done = op.transferred > kHeaderBytes ? op.transferred - kHeaderBytes : 0;
    if (op.header.nbytes > payload_done) {
      iov[iovcnt++] = {op.data + payload_done, std::min(op.header.nbytes - payload_done, budget)};
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = iovcnt;
    ssize_t sent = sendmsg(conn.fd, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
      return fail("connection to " + who + " failed: " + errno_text(errno), false);
    }
    op.transferred += sent;
    budget -= std::min<uint64_t>(budget, sent);
    if (op.transferred == total) {
      TransportRequest done = std::move(conn.sending);
      conn.sending.reset();
      complete(*done);
    }
  }
}

void TcpTransport::peer_closed(Connection& conn) {
  // The peer sends nothing after its goodbye: stop polling, so the end of stream (or a reset
  // once it closes) that follows is not taken for a failure.
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, conn.fd, nullptr);
  conn.closed = true;
  bool expecting;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    conn.peer_closed = true;
    expecting = !conn.recvs.empty();
  }
  if (expecting) {
    fail(peer_names_[conn.peer] + " closed its communicator while this rank still expects data from it", false);
  }
}

void TcpTransport::say_goodbye() {
  // Called once the progress thread has stopped. Nothing is in flight: a collective returns
  // only when its sends are done, so the goodbye follows the last frame on each socket.
  FrameHeader goodbye;
  goodbye.kind = static_cast<uint8_t>(FrameKind::kGoodbye);
  for (auto& peer : connections_) {
    for (auto& conn : peer) {
      if (conn->closed || failed_) continue;
      [[maybe_unused]] ssize_t ignored =
          ::send(conn->fd, &goodbye, kHeaderBytes, MSG_NOSIGNAL | MSG_DONTWAIT);
      shutdown(conn->fd, SHUT_WR);
    }
  }
}

void TcpTransport::notify_peers_of_failure() {
  std::string reason;
  bool timed_out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (peers_notified_) return;
    peers_notified_ = true;
    reason = failure_.substr(0, kMaxAbortReason);
    timed_out = failure_timed_out_;
  }
  // Peers hear "rank R aborted: <reason>", so every rank's error names the first cause.
  std::string text = "rank " + std::to_string(rank_) + ": " + reason;
  text.resize(std::min<size_t>(text.size(), kMaxAbortReason));
  FrameHeader abort_header;
  abort_header.kind = static_cast<uint8_t>(FrameKind::kAbort);
  abort_header.op = timed_out ? 1 : 0;
  abort_header.nbytes = text.size();
  for (auto& peer : connections_) {
    for (auto& conn : peer) {
      // A frame half-written cannot be interrupted; that peer sees the shutdown instead.
      bool between_frames = !conn->sending || conn->sending->transferred == 0;
      if (between_frames) {
        iovec iov[2] = {{&abort_header, kHeaderBytes}, {text.data(), text.size()}};
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        [[maybe_unused]] ssize_t ignored = sendmsg(conn->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      shutdown(conn->fd, SHUT_RDWR);
      epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, conn->fd, nullptr);
      conn->closed = true;
    }
  }
}

}  // namespace collectives
