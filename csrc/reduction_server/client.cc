#include "reduction_server/client.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>

#include "transport/socket.h"

namespace collectives {
namespace {

constexpr size_t kHeaderBytes = sizeof(FrameHeader);
constexpr size_t kNone = static_cast<size_t>(-1);
// How often a waiting exchange looks at the clock, at cancel() and at the rest of the job.
constexpr int kPollMillis = 20;
constexpr int kGoodbyeMillis = 1000;

bool same_chunk(const FrameHeader& a, const FrameHeader& b) {
  return a.collective == b.collective && a.dtype == b.dtype && a.op == b.op && a.seq == b.seq &&
         a.count == b.count && a.unit == b.unit && a.nbytes == b.nbytes && a.root == b.root;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace

struct ReducerChannels::Reducer {
  int index = 0;
  FileDescriptor fd;
  std::string name;
  std::atomic<bool> alive{true};
  std::atomic<uint64_t> bytes_sent{0}, bytes_received{0};

  // The state of one exchange (indices into its transfers):
  std::deque<size_t> queue;     // to send, in order
  std::vector<size_t> waiting;  // sent or being sent, sum not yet received
  size_t sending = kNone;       // the one being written
  uint64_t sent_bytes = 0;      // of its header + payload
  FrameHeader incoming;
  size_t header_bytes = 0;
  size_t receiving = kNone;  // the transfer whose sum is being read
  uint64_t payload_bytes = 0;
  std::vector<char> staging;  // the sum being read; copied into place once whole
  Clock::time_point last_heard;
  uint32_t interest = 0;

  bool mid_frame() const { return sending != kNone && sent_bytes > 0; }
  bool busy() const { return !queue.empty() || !waiting.empty(); }
};

ReducerChannels::ReducerChannels(std::vector<int> fds, std::vector<std::string> names) {
  for (size_t r = 0; r < fds.size(); ++r) {
    auto reducer = std::make_unique<Reducer>();
    reducer->index = static_cast<int>(r);
    reducer->fd = FileDescriptor(fds[r]);
    reducer->name = r < names.size() ? names[r] : "reducer " + std::to_string(r);
    reducers_.push_back(std::move(reducer));
  }
  if (names.size() != fds.size()) {
    throw std::invalid_argument("need one name per reducer connection");
  }
  epoll_fd_ = FileDescriptor(epoll_create1(EPOLL_CLOEXEC));
  wake_fd_ = FileDescriptor(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (epoll_fd_.get() < 0 || wake_fd_.get() < 0) {
    throw std::runtime_error("epoll/eventfd: " + errno_text(errno));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;
  epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &ev);
  for (auto& reducer : reducers_) set_nonblocking(reducer->fd.get());
}

ReducerChannels::~ReducerChannels() { close(false); }

std::vector<int> ReducerChannels::alive() const {
  std::vector<int> result;
  for (int r = 0; r < count(); ++r) {
    if (reducers_[r]->alive) result.push_back(r);
  }
  return result;
}

const std::string& ReducerChannels::name(int reducer) const { return reducers_[reducer]->name; }

void ReducerChannels::wake() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t ignored = write(wake_fd_.get(), &one, sizeof(one));
}

void ReducerChannels::cancel(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cancelled_.empty()) cancelled_ = reason;
  }
  wake();
}

void ReducerChannels::lose(Reducer& reducer, std::vector<ShardTransfer>& transfers,
                           const std::string& why,
                           const std::function<void(const std::string&)>& log) {
  size_t unanswered = reducer.queue.size() + reducer.waiting.size();
  for (size_t i : reducer.queue) transfers[i].state = ShardTransfer::State::kLost;
  for (size_t i : reducer.waiting) transfers[i].state = ShardTransfer::State::kLost;
  log(reducer.name + " failed: it " + why + "; its " + std::to_string(unanswered) +
      " unanswered chunk(s) of this all-reduce go to the other reducers");
  abandon(reducer.index);
}

void ReducerChannels::abandon(int index) {
  Reducer& reducer = *reducers_[index];
  std::lock_guard<std::mutex> lock(mutex_);
  if (!reducer.alive) return;
  reducer.alive = false;
  if (reducer.interest != 0) epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, reducer.fd.get(), nullptr);
  reducer.interest = 0;
  // A goodbye in the middle of a frame would corrupt the stream; the end of it says enough.
  if (!reducer.mid_frame()) {
    FrameHeader goodbye;
    goodbye.kind = static_cast<uint8_t>(FrameKind::kGoodbye);
    write_frame(reducer.fd.get(), goodbye, "", 0);
  }
  reducer.queue.clear();
  reducer.waiting.clear();
  reducer.sending = kNone;
  reducer.receiving = kNone;
  reducer.fd.reset();
}

void ReducerChannels::close(bool clean) {
  for (int r = 0; r < count(); ++r) {
    Reducer& reducer = *reducers_[r];
    std::lock_guard<std::mutex> lock(mutex_);
    if (!reducer.alive) continue;
    reducer.alive = false;
    if (clean) {
      FrameHeader goodbye;
      goodbye.kind = static_cast<uint8_t>(FrameKind::kGoodbye);
      write_frame(reducer.fd.get(), goodbye, "", kGoodbyeMillis);
    }
    reducer.fd.reset();
  }
}

std::vector<ReducerStat> ReducerChannels::stats() const {
  std::vector<ReducerStat> result;
  for (const auto& reducer : reducers_) {
    result.push_back({reducer->name, reducer->alive, reducer->bytes_sent, reducer->bytes_received});
  }
  return result;
}

void ReducerChannels::exchange(std::vector<ShardTransfer>& transfers, int inflight,
                               double heartbeat_timeout, Deadline deadline,
                               const std::function<std::string()>& job_failure,
                               const std::function<void(const std::string&)>& log) {
  const auto start = Clock::now();
  for (auto& reducer : reducers_) {
    reducer->queue.clear();
    reducer->waiting.clear();
    reducer->sending = kNone;
    reducer->header_bytes = 0;
    reducer->receiving = kNone;
    reducer->last_heard = start;
  }
  for (size_t i = 0; i < transfers.size(); ++i) {
    ShardTransfer& t = transfers[i];
    if (t.state != ShardTransfer::State::kQueued) continue;
    if (reducers_[t.reducer]->alive) {
      reducers_[t.reducer]->queue.push_back(i);
    } else {
      t.state = ShardTransfer::State::kLost;
    }
  }

  // Writes the frames of `reducer` until its socket is full; false if the reducer failed.
  auto write_some = [&](Reducer& reducer) -> bool {
    while (reducer.sending != kNone ||
           (!reducer.queue.empty() && reducer.waiting.size() < static_cast<size_t>(inflight))) {
      if (reducer.sending == kNone) {
        reducer.sending = reducer.queue.front();
        reducer.queue.pop_front();
        if (reducer.waiting.empty()) reducer.last_heard = Clock::now();  // it owes nothing yet
        reducer.waiting.push_back(reducer.sending);
        reducer.sent_bytes = 0;
      }
      ShardTransfer& t = transfers[reducer.sending];
      const uint64_t total = kHeaderBytes + t.header.nbytes;
      iovec iov[2];
      int parts = 0;
      if (reducer.sent_bytes < kHeaderBytes) {
        iov[parts++] = {reinterpret_cast<char*>(&t.header) + reducer.sent_bytes,
                        kHeaderBytes - reducer.sent_bytes};
        iov[parts++] = {t.data, t.header.nbytes};
      } else {
        iov[parts++] = {t.data + (reducer.sent_bytes - kHeaderBytes), total - reducer.sent_bytes};
      }
      msghdr message{};
      message.msg_iov = iov;
      message.msg_iovlen = parts;
      ssize_t n = ::sendmsg(reducer.fd.get(), &message, MSG_NOSIGNAL);
      if (n < 0) {
        if (would_block(errno)) return true;
        lose(reducer, transfers, "refused our data (" + errno_text(errno) + ")", log);
        return false;
      }
      reducer.bytes_sent += n;
      reducer.sent_bytes += n;
      if (reducer.sent_bytes == total) reducer.sending = kNone;
    }
    return true;
  };

  // Reads what `reducer` sent until its socket is empty; false if the reducer failed.
  auto read_some = [&](Reducer& reducer) -> bool {
    for (;;) {
      char* into;
      size_t want;
      const bool in_header = reducer.header_bytes < kHeaderBytes;
      if (in_header) {
        into = reinterpret_cast<char*>(&reducer.incoming) + reducer.header_bytes;
        want = kHeaderBytes - reducer.header_bytes;
      } else {
        into = reducer.staging.data() + reducer.payload_bytes;
        want = reducer.incoming.nbytes - reducer.payload_bytes;
      }
      ssize_t n = ::recv(reducer.fd.get(), into, want, 0);
      if (n == 0 || (n < 0 && !would_block(errno))) {
        lose(reducer, transfers,
             n == 0 ? "closed the connection" : "lost the connection (" + errno_text(errno) + ")",
             log);
        return false;
      }
      if (n < 0) return true;
      reducer.bytes_received += n;
      reducer.last_heard = Clock::now();
      if (in_header) {
        reducer.header_bytes += n;
        if (reducer.header_bytes < kHeaderBytes) continue;
        const FrameHeader& h = reducer.incoming;
        if (h.magic != kFrameMagic || h.version != kProtocolVersion) {
          throw CollectiveError(reducer.name + " sent a frame that is not collectives protocol " +
                                std::to_string(kProtocolVersion));
        }
        const auto kind = static_cast<FrameKind>(h.kind);
        if (kind == FrameKind::kHeartbeat) {
          reducer.header_bytes = 0;
          continue;
        }
        if (kind == FrameKind::kAbort) {
          if (h.nbytes > kMaxAbortReason) {
            throw CollectiveError(reducer.name + " sent an oversized abort notice");
          }
          reducer.receiving = kNone;
        } else if (kind == FrameKind::kData) {
          auto match = std::find_if(reducer.waiting.begin(), reducer.waiting.end(), [&](size_t i) {
            return same_chunk(transfers[i].header, h) && i != reducer.sending;
          });
          if (match == reducer.waiting.end()) {
            throw CollectiveError(reducer.name + " sent the sum of chunk " + std::to_string(h.unit) +
                                  " of " + describe(h) + ", which this worker did not ask it for");
          }
          reducer.receiving = *match;
        } else {
          throw CollectiveError(reducer.name + " sent a frame of unknown kind " +
                                std::to_string(h.kind));
        }
        reducer.staging.resize(h.nbytes);
        reducer.payload_bytes = 0;
        if (h.nbytes > 0) continue;
      } else {
        reducer.payload_bytes += n;
        if (reducer.payload_bytes < reducer.incoming.nbytes) continue;
      }
      // A whole frame is in.
      reducer.header_bytes = 0;
      if (reducer.receiving == kNone) {
        throw CollectiveError(std::string(reducer.staging.begin(), reducer.staging.end()));
      }
      ShardTransfer& t = transfers[reducer.receiving];
      std::memcpy(t.data, reducer.staging.data(), t.header.nbytes);
      t.state = ShardTransfer::State::kDone;
      reducer.waiting.erase(std::find(reducer.waiting.begin(), reducer.waiting.end(), reducer.receiving));
      reducer.receiving = kNone;
    }
  };

  auto update_interest = [&](Reducer& reducer) {
    uint32_t wanted = 0;
    if (reducer.alive && reducer.busy()) {
      wanted = EPOLLIN;
      if (reducer.sending != kNone || (!reducer.queue.empty() &&
                                       reducer.waiting.size() < static_cast<size_t>(inflight))) {
        wanted |= EPOLLOUT;
      }
    }
    if (wanted == reducer.interest) return;
    epoll_event ev{};
    ev.events = wanted;
    ev.data.ptr = &reducer;
    int op = reducer.interest == 0 ? EPOLL_CTL_ADD : wanted == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    epoll_ctl(epoll_fd_.get(), op, reducer.fd.get(), &ev);
    reducer.interest = wanted;
  };

  for (auto& reducer : reducers_) {
    if (reducer->alive && reducer->busy()) write_some(*reducer);
  }
  epoll_event events[16];
  for (;;) {
    bool busy = false;
    for (auto& reducer : reducers_) {
      if (!reducer->alive) continue;
      if (reducer->busy() && !reducer->waiting.empty() &&
          seconds_since(reducer->last_heard) > heartbeat_timeout) {
        char seconds[32];
        std::snprintf(seconds, sizeof(seconds), "%g", heartbeat_timeout);
        lose(*reducer, transfers,
             std::string("sent nothing (no sum, no heartbeat) for ") + seconds +
                 " s (COLLECTIVES_RS_HEARTBEAT_TIMEOUT)",
             log);
        continue;
      }
      busy |= reducer->busy();
      update_interest(*reducer);
    }
    if (!busy) break;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!cancelled_.empty()) throw CollectiveError(cancelled_);
    }
    std::string failure = job_failure();
    if (!failure.empty()) throw CollectiveError(failure);
    if (Clock::now() >= deadline) {
      std::string owing;
      for (auto& reducer : reducers_) {
        if (reducer->alive && reducer->busy()) owing += (owing.empty() ? "" : ", ") + reducer->name;
      }
      throw TimeoutError("timed out waiting for sums from " + owing +
                         " (they are alive, so a worker is missing: its log says why)");
    }
    int n = epoll_wait(epoll_fd_.get(), events, 16, kPollMillis);
    for (int i = 0; i < n; ++i) {
      auto* reducer = static_cast<Reducer*>(events[i].data.ptr);
      if (reducer == nullptr) {
        uint64_t count;
        [[maybe_unused]] ssize_t ignored = read(wake_fd_.get(), &count, sizeof(count));
        continue;
      }
      if (!reducer->alive) continue;
      if ((events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !read_some(*reducer)) continue;
      if (events[i].events & EPOLLOUT) write_some(*reducer);
    }
  }
}

}  // namespace collectives
