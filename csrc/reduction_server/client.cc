#include "reduction_server/client.h"

#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>

#include "transport/socket.h"

namespace collectives {
namespace {

// How often waiters and the progress thread look at the clock and at the rest of the job.
constexpr int kPollMillis = 20;
constexpr int kGoodbyeMillis = 1000;
// Over UCX: how long the progress thread sleeps on the UCX worker's descriptor alone while sums
// are owed (a transport may move bytes without signalling it).
constexpr int kUcxBusyMillis = 2;
constexpr double kUcxAnswerSeconds = 10;

/*
 * Telling a stopped reducer from a cut link. Keepalive probes every kProbeSeconds while the
 * link is idle, and the acknowledgements of our chunks while it is busy, keep the reducer's
 * host answering this worker's TCP: a host that has not answered for kPathSilenceSeconds is
 * cut off (or down). A reducer silent for the heartbeat deadline while its host answered
 * throughout is stopped or stuck, and is dropped then. A cut is waited out longer, since
 * TCP resends with a backoff that doubles: a cut of c seconds can hold data back until
 * about 2c + RTO after it began, so a cut shorter than the deadline d ends within 2d +
 * kBackoffSlackSeconds; a reducer silent past that is unreachable, and is dropped.
 */
constexpr int kProbeSeconds = 1;
constexpr double kPathSilenceSeconds = 1.5;
constexpr double kBackoffSlackSeconds = 1.0;
// Unanswered probes after which the kernel itself ends the connection: far beyond any wait
// above, so the deadlines decide.
constexpr int kProbeCount = 120;

bool same_chunk(const FrameHeader& a, const FrameHeader& b) {
  return a.collective == b.collective && a.dtype == b.dtype && a.op == b.op && a.seq == b.seq &&
         a.count == b.count && a.unit == b.unit && a.nbytes == b.nbytes && a.root == b.root;
}

// One transfer of one batch.
struct Ref {
  ShardBatchHandle batch;
  size_t index = 0;
  ShardTransfer& transfer() const { return batch->transfers[index]; }
  bool operator==(const Ref& other) const {
    return batch == other.batch && index == other.index;
  }
};

}  // namespace

struct ReducerChannels::Reducer {
  Reducer(int index, const Link& link, std::string name)
      : index(index), fd(link.fd), stream(std::make_unique<SocketStream>(link.fd)), name(std::move(name)),
        writer(sending_protection(link)), reader(receiving_protection(link)) {}
  int index = 0;
  FileDescriptor fd;  // the authenticated TCP link; its keepalive answers tell a cut from a stop
  std::unique_ptr<ByteStream> stream;  // what the frames go over: the link, or a UCX stream
  const char* transport = "tcp";       // the stream's kind (the stream goes when abandoned)
  std::string name;
  std::atomic<bool> alive{true};
  std::atomic<uint64_t> bytes_sent{0}, bytes_received{0};

  std::deque<Ref> queue;     // to send, in order
  std::vector<Ref> waiting;  // sent or being sent, sum not yet received
  std::optional<Ref> sending;  // being written
  FrameWriter writer;
  FrameReader reader;
  std::optional<Ref> receiving;  // whose sum is being read (none: a control frame)
  std::vector<char> staging;  // the frame being read; a sum is copied into place once whole
  Clock::time_point last_heard;
  Clock::time_point cut_seen;  // when its host was last found not answering (see above)
  WaitingFor waits;  // as its last heartbeat said
  Clock::time_point waits_heard;
  std::array<char, 4096> sink;  // what is read and dropped while saying farewell
  std::string lost;        // why this worker stopped using it, when it found that out itself
  bool announced = false;  // `lost` was handed to take_losses()
  uint32_t interest = 0;

  // The queue is ordered by all-reduce, oldest first, and each all-reduce has a window of its
  // own: chunks of an all-reduce posted ahead can never hold back the recovery of an older
  // one, which every worker needs first (the order in which the workers post them differs).
  bool may_send(int inflight) const {
    if (sending) return true;
    if (queue.empty()) return false;
    const uint64_t seq = queue.front().transfer().header.seq;
    const auto same = std::count_if(waiting.begin(), waiting.end(), [&](const Ref& ref) {
      return ref.transfer().header.seq == seq;
    });
    return same < inflight;
  }
};

ReducerChannels::ReducerChannels(std::vector<Link> links, std::vector<std::string> names,
                                 int inflight, double heartbeat_timeout,
                                 std::function<void(const std::string&)> log,
                                 const std::vector<uint32_t>& groups, bool ucx)
    : inflight_(std::max(1, inflight)), heartbeat_timeout_(heartbeat_timeout), log_(std::move(log)) {
  for (size_t r = 0; r < links.size(); ++r) {
    reducers_.push_back(std::make_unique<Reducer>(
        static_cast<int>(r), links[r], r < names.size() ? names[r] : "reducer " + std::to_string(r)));
  }
  if (names.size() != links.size()) {
    throw std::invalid_argument("need one name per reducer connection");
  }
  for (auto& reducer : reducers_) {
    set_nonblocking(reducer->fd.get());
    set_keepalive(reducer->fd.get(), kProbeSeconds, kProbeSeconds, kProbeCount);
  }
  if (ucx) switch_to_ucx();
  if (!groups.empty()) {
    // Ahead of any chunk on each connection; a reducer that cannot take it is lost here.
    std::string payload(4 * groups.size(), '\0');
    for (size_t k = 0; k < groups.size(); ++k) {
      for (int b = 0; b < 4; ++b) payload[4 * k + b] = static_cast<char>(groups[k] >> (8 * b));
    }
    FrameHeader header;
    header.kind = static_cast<uint8_t>(FrameKind::kGroups);
    header.nbytes = payload.size();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& reducer : reducers_) {
      if (!reducer->alive) continue;
      if (!write_frame(*reducer->stream, reducer->writer, header, payload, deadline_after(heartbeat_timeout_))) {
        lose(*reducer, "did not take this worker's groups (" + errno_text(errno) + ")");
      }
    }
  }
  progress_thread_ = std::thread([this] { progress_loop(); });
}

/*
 * Every reducer first hears this worker's UCX address, then each answers with its own (or, if it
 * cannot run over UCX, with an abort notice that it relays to every worker). Both go over the
 * authenticated link, as frames protected and counted like the ones after them, so a reducer
 * reaches only workers that authenticated themselves, and the reverse.
 */
void ReducerChannels::switch_to_ucx() {
  std::lock_guard<std::mutex> lock(mutex_);
  ucx_ = make_ucx_stream_worker("");
  poller_.watch(ucx_->fd(), 0, EPOLLIN, this);
  // A reducer answers once it serves: after every worker has joined it.
  const Deadline deadline = deadline_after(std::max(heartbeat_timeout_, kUcxAnswerSeconds));
  FrameHeader header;
  header.kind = static_cast<uint8_t>(FrameKind::kUcxAddress);
  header.nbytes = ucx_->address().size();
  for (auto& reducer : reducers_) {
    if (!write_frame(*reducer->stream, reducer->writer, header, ucx_->address(), deadline)) {
      lose(*reducer, "did not take this worker's UCX address (" + errno_text(errno) + ")");
    }
  }
  for (auto& reducer : reducers_) {
    if (!reducer->alive) continue;
    std::string answer;
    const std::string why = read_frame(*reducer->stream, reducer->reader, &answer, kMaxUcxAddress, deadline);
    if (!why.empty()) {
      lose(*reducer, why + " instead of its UCX address");
    } else if (reducer->reader.header().kind == static_cast<uint8_t>(FrameKind::kAbort)) {
      fail(reducer->name + ": " + answer);
      abandon_locked(*reducer, std::nullopt);
    } else if (reducer->reader.header().kind != static_cast<uint8_t>(FrameKind::kUcxAddress)) {
      fail(reducer->name + " answered this worker's UCX address with a frame of kind " +
           std::to_string(reducer->reader.header().kind));
      abandon_locked(*reducer, std::nullopt);
    } else {
      reducer->stream = ucx_->connect(answer, reducer->name);
      reducer->transport = reducer->stream->kind();
    }
  }
}

ReducerChannels::~ReducerChannels() { close("the worker closed its channels to the reducers"); }

std::vector<int> ReducerChannels::alive() const {
  std::vector<int> result;
  for (int r = 0; r < count(); ++r) {
    if (reducers_[r]->alive) result.push_back(r);
  }
  return result;
}

const std::string& ReducerChannels::name(int reducer) const { return reducers_[reducer]->name; }

void ReducerChannels::wake() { poller_.wake(); }

ShardBatchHandle ReducerChannels::post(std::vector<ShardTransfer> transfers) {
  auto batch = std::make_shared<ShardBatch>();
  batch->transfers = std::move(transfers);
  std::lock_guard<std::mutex> lock(mutex_);
  batch->unfinished = batch->transfers.size();
  for (size_t i = 0; i < batch->transfers.size(); ++i) {
    Reducer& reducer = *reducers_.at(batch->transfers[i].reducer);
    if (!reducer.alive || closed_) {
      settle(*batch, batch->transfers[i], ShardTransfer::State::kLost);
      continue;
    }
    if (reducer.queue.empty() && reducer.waiting.empty()) reducer.last_heard = Clock::now();
    const uint64_t seq = batch->transfers[i].header.seq;
    auto after = reducer.queue.end();  // behind its own all-reduce and every older one
    while (after != reducer.queue.begin() && std::prev(after)->transfer().header.seq > seq) --after;
    reducer.queue.insert(after, Ref{batch, i});
    update_interest(reducer);
  }
  // Streams over UCX have no descriptor whose interest wakes the progress thread to send.
  if (ucx_) wake();
  return batch;
}

void ReducerChannels::settle(ShardBatch& batch, ShardTransfer& transfer, ShardTransfer::State state) {
  transfer.state = state;
  if (--batch.unfinished == 0) settled_.notify_all();
}

bool ReducerChannels::wait(const ShardBatchHandle& batch, Deadline deadline,
                           const std::function<std::string()>& watch) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    if (!failure_.empty()) throw CollectiveError(failure_);
    if (batch->unfinished == 0) return true;
    lock.unlock();
    std::string failure = watch();
    lock.lock();
    if (!failure.empty()) throw CollectiveError(failure);
    if (batch->unfinished == 0) continue;
    if (Clock::now() >= deadline) return false;
    settled_.wait_for(lock, std::chrono::milliseconds(kPollMillis));
  }
}

std::vector<int> ReducerChannels::awaited_workers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> ranks;
  for (const auto& reducer : reducers_) {
    if (!reducer->alive || reducer->waiting.empty()) continue;
    ranks.insert(ranks.end(), reducer->waits.ranks.begin(), reducer->waits.ranks.end());
  }
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  return ranks;
}

// The workers the reducers name are the ones missing (stopped, or cut off from that reducer).
std::string ReducerChannels::describe_waits(const std::vector<int>& culprits) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string text;
  for (const auto& reducer : reducers_) {
    if (!reducer->alive || reducer->waiting.empty()) continue;
    text += (text.empty() ? "" : "; ") + reducer->name + " ";
    if (reducer->waits.missing) {
      text += reducer->waits.describe(std::chrono::duration<double>(Clock::now() - reducer->waits_heard).count(),
                                      culprits);
    } else {
      text += "owes sums but waits for no worker's chunk (it, or its link to this worker, is slow)";
    }
  }
  return text;
}

void ReducerChannels::fail(const std::string& reason) {
  if (failure_.empty()) failure_ = reason;
  settled_.notify_all();
}

void ReducerChannels::cancel(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  fail(reason);
}

void ReducerChannels::lose(Reducer& reducer, const std::string& why) {
  const size_t unanswered = reducer.queue.size() + reducer.waiting.size();
  log_(reducer.name + " failed: it " + why + "; its " + std::to_string(unanswered) +
       " unanswered chunk(s) go to the other reducers");
  reducer.lost = why;
  abandon_locked(reducer, FrameKind::kGoodbye, "it " + why);
}

bool ReducerChannels::abandon(int index, const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  Reducer& reducer = *reducers_.at(index);
  if (!reducer.alive) return false;
  log_(reducer.name + " " + why);
  abandon_locked(reducer, FrameKind::kGoodbye, why);
  return true;
}

std::vector<std::pair<int, std::string>> ReducerChannels::take_losses() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<int, std::string>> losses;
  for (auto& reducer : reducers_) {
    if (reducer->lost.empty() || reducer->announced) continue;
    reducer->announced = true;
    losses.emplace_back(reducer->index, reducer->lost);
  }
  return losses;
}

void ReducerChannels::abandon_locked(Reducer& reducer, std::optional<FrameKind> farewell,
                                     const std::string& reason) {
  if (!reducer.alive) return;
  reducer.alive = false;
  reducer.interest = poller_.watch(reducer.fd.get(), reducer.interest, 0, &reducer);
  if (farewell) say_farewell(reducer, *farewell, reason);
  reducer.stream.reset();  // first: a UCX receive may be under way into `staging`
  for (auto& ref : reducer.queue) settle(*ref.batch, ref.transfer(), ShardTransfer::State::kLost);
  for (auto& ref : reducer.waiting) settle(*ref.batch, ref.transfer(), ShardTransfer::State::kLost);
  reducer.queue.clear();
  reducer.waiting.clear();
  reducer.sending.reset();
  reducer.receiving.reset();
  reducer.fd.reset();
}

/*
 * A reducer that may still be alive must hear a goodbye, or it takes this worker for dead and
 * aborts the whole job; and after a failure it must hear why, to tell the other workers
 * instead of reporting this worker dead. So: finish the frame being written (its buffer is
 * still valid: its all-reduce waits on this mutex), say goodbye or why, end the stream, and
 * read away what the reducer sent meanwhile, since closing with unread bytes would reset the
 * connection and could destroy the farewell. Every step is bounded: a silent reducer costs
 * kGoodbyeMillis.
 */
void ReducerChannels::say_farewell(Reducer& reducer, FrameKind kind, const std::string& reason) {
  ByteStream& stream = *reducer.stream;
  const Deadline deadline = deadline_after(kGoodbyeMillis / 1000.0);
  FrameHeader farewell;
  farewell.kind = static_cast<uint8_t>(kind);
  const std::string text = reason.substr(0, kMaxAbortReason);
  farewell.nbytes = text.size();
  // The frame under way is finished first; if the reducer is gone or silent, the end of the
  // connection says enough.
  if (!write_frame(stream, reducer.writer, farewell, text, deadline)) return;
  stream.end_writes();
  for (;;) {
    ssize_t n = stream.read_some(reducer.sink.data(), reducer.sink.size());
    if (n == 0 || (n < 0 && !would_block(errno))) return;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (n > 0) continue;
    if (left.count() <= 0) return;
    stream.wait(POLLIN, static_cast<int>(left.count()));
  }
}

void ReducerChannels::close(const std::string& failure) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = stopping_ = true;
  }
  wake();
  progress_thread_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& reducer : reducers_) {
    abandon_locked(*reducer, failure.empty() ? FrameKind::kGoodbye : FrameKind::kAbort, failure);
  }
}

std::vector<ReducerStat> ReducerChannels::stats() const {
  std::vector<ReducerStat> result;
  for (const auto& reducer : reducers_) {
    result.push_back({reducer->name, reducer->alive, reducer->bytes_sent, reducer->bytes_received,
                      reducer->transport});
  }
  return result;
}

void ReducerChannels::update_interest(Reducer& reducer) {
  // Over UCX the link is watched for its end only, at all times: it ends the moment the
  // reducer's process does, which this worker then tells the others, rather than hear it from them.
  uint32_t wanted = 0;
  if (reducer.alive) {
    const bool over_ucx = reducer.stream->poll_fd() < 0;
    if (!reducer.queue.empty() || !reducer.waiting.empty() || over_ucx) wanted = EPOLLIN;
    if (!over_ucx && reducer.may_send(inflight_)) wanted |= EPOLLOUT;
  }
  reducer.interest = poller_.watch(reducer.fd.get(), reducer.interest, wanted, &reducer);
}

bool ReducerChannels::write_some(Reducer& reducer) {
  while (reducer.may_send(inflight_)) {
    if (!reducer.sending) {
      reducer.sending = reducer.queue.front();
      reducer.queue.pop_front();
      if (reducer.waiting.empty()) reducer.last_heard = Clock::now();  // it owed us nothing
      reducer.waiting.push_back(*reducer.sending);
      const ShardTransfer& t = reducer.sending->transfer();
      reducer.writer.start(t.header, t.data);
    }
    ssize_t n = reducer.writer.write_some(*reducer.stream);
    if (n < 0) {
      lose(reducer, "refused our data (" + errno_text(errno) + ")");
      return false;
    }
    if (n == 0) return true;
    reducer.bytes_sent += n;
    if (reducer.writer.done()) reducer.sending.reset();
  }
  return true;
}

bool ReducerChannels::read_some(Reducer& reducer) {
  FrameReader& reader = reducer.reader;
  for (;;) {
    ssize_t n = reducer.stream->read_some(reader.next(), reader.wanted(UINT64_MAX));
    if (n == 0 || (n < 0 && !would_block(errno))) {
      lose(reducer, n == 0 ? "closed the connection" : "lost the connection (" + errno_text(errno) + ")");
      return false;
    }
    if (n < 0) return true;
    reducer.bytes_received += n;
    reducer.last_heard = Clock::now();
    const FrameReader::Event event = reader.advance(n);
    if (event == FrameReader::Event::kNone) continue;
    if (event == FrameReader::Event::kHeader) {
      const FrameHeader& h = reader.header();
      std::string violation;
      const auto kind = static_cast<FrameKind>(h.kind);
      reducer.receiving.reset();
      if (h.magic != kFrameMagic || h.version != kProtocolVersion) {
        violation = "sent a frame that is not collectives protocol " + std::to_string(kProtocolVersion);
      } else if (kind == FrameKind::kAbort || kind == FrameKind::kHeartbeat) {
        if (h.nbytes > kMaxAbortReason) violation = "sent an oversized control frame";
      } else if (kind == FrameKind::kData) {
        auto match = std::find_if(reducer.waiting.begin(), reducer.waiting.end(), [&](const Ref& ref) {
          return same_chunk(ref.transfer().header, h) && !(reducer.sending && *reducer.sending == ref);
        });
        if (match == reducer.waiting.end()) {
          violation = "sent the sum of chunk " + std::to_string(h.unit) + " of " + describe(h) +
                      ", which this worker did not ask it for";
        } else {
          reducer.receiving = *match;
        }
      } else {
        violation = "sent a frame of unknown kind " + std::to_string(h.kind);
      }
      if (!violation.empty()) {
        fail(reducer.name + " " + violation + (reader.checks() ? kUncheckedHeader : ""));
        abandon_locked(reducer, std::nullopt);
        return false;
      }
      reducer.staging.resize(h.nbytes);
      if (!reader.read_payload_into(reducer.staging.data())) continue;
    }
    // A whole frame is in: nothing of it is used before its tag is checked.
    if (!reader.authentic()) {
      fail(reducer.name + " sent a frame that failed its integrity check (COLLECTIVES_WIRE_SECURITY=" +
           to_string(reader.security()) + "): it was altered on the way, or injected by someone other than " +
           reducer.name);
      abandon_locked(reducer, std::nullopt);
      return false;
    }
    const FrameHeader h = reader.header();
    reader.next_frame();
    if (h.kind == static_cast<uint8_t>(FrameKind::kHeartbeat)) {
      if (!WaitingFor::parse(h, std::string(reducer.staging.begin(), reducer.staging.end()), &reducer.waits)) {
        fail(reducer.name + " sent a malformed heartbeat");
        abandon_locked(reducer, std::nullopt);
        return false;
      }
      reducer.waits_heard = Clock::now();
      continue;
    }
    if (!reducer.receiving) {  // an abort notice: the job failed
      fail(reducer.name + ": " + std::string(reducer.staging.begin(), reducer.staging.end()));
      abandon_locked(reducer, std::nullopt);
      return false;
    }
    Ref ref = *reducer.receiving;
    reducer.receiving.reset();
    ShardTransfer& t = ref.transfer();
    std::memcpy(t.data, reducer.staging.data(), t.header.nbytes);
    reducer.waiting.erase(std::find(reducer.waiting.begin(), reducer.waiting.end(), ref));
    settle(*ref.batch, t, ShardTransfer::State::kDone);
  }
}

// Every stream over UCX is tried on each turn: they share the UCX worker's one descriptor.
// Writes first: a chunk's send that UCX finished in this progress is taken for done before its
// sum is read (a sum of a chunk still being sent breaks the protocol), and again after the
// sums, which open the window for the next chunks.
void ReducerChannels::drive_ucx() {
  ucx_->progress();
  for (auto& reducer : reducers_) {
    if (reducer->alive && write_some(*reducer) && read_some(*reducer)) write_some(*reducer);
  }
}

std::string ReducerChannels::silence_verdict(Reducer& reducer) {
  const Clock::time_point now = Clock::now();
  const double silent = std::chrono::duration<double>(now - reducer.last_heard).count();
  if (reducer.waiting.empty()) return "";
  if (silent > kPathSilenceSeconds) {
    const double unanswered = seconds_since_peer_acked(reducer.fd.get());
    if (unanswered < 0 || unanswered > kPathSilenceSeconds) reducer.cut_seen = now;
  }
  const bool cut = reducer.cut_seen > reducer.last_heard;
  const double limit = cut ? 2 * heartbeat_timeout_ + kBackoffSlackSeconds : heartbeat_timeout_;
  if (silent <= limit) return "";
  char seconds[96];
  std::snprintf(seconds, sizeof(seconds), "%.1f s (COLLECTIVES_RS_HEARTBEAT_TIMEOUT=%g)", silent,
                heartbeat_timeout_);
  return std::string("sent nothing (no sum, no heartbeat) for ") + seconds + ": " +
         (cut ? "its host stopped answering this worker's TCP: the link is cut or the host is down (a cut is "
                "waited out for twice the deadline and a second, as TCP's backoff needs)"
              : "its host still answers: the reducer process is stopped or stuck");
}

void ReducerChannels::progress_loop() {
  epoll_event events[16];
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    for (auto& reducer : reducers_) {
      if (!reducer->alive) continue;
      const std::string silence = silence_verdict(*reducer);
      if (!silence.empty()) {
        lose(*reducer, silence);
        continue;
      }
      update_interest(*reducer);
    }
    int sleep_millis = kPollMillis;
    if (ucx_) {
      drive_ucx();
      const bool owed = std::any_of(reducers_.begin(), reducers_.end(), [](const auto& r) {
        return r->alive && !(r->waiting.empty() && r->queue.empty());
      });
      sleep_millis = !ucx_->arm() ? 0 : owed ? kUcxBusyMillis : kPollMillis;
    }
    lock.unlock();
    int n = poller_.wait(events, 16, sleep_millis);
    lock.lock();
    for (int i = 0; i < n && !stopping_; ++i) {
      if (events[i].data.ptr == this) continue;  // the UCX worker's descriptor: driven above
      auto* reducer = static_cast<Reducer*>(events[i].data.ptr);
      if (!reducer->alive) continue;
      if ((events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !read_some(*reducer)) continue;
      if (reducer->stream->poll_fd() < 0) {
        // Its link over UCX stirred: what it sent over UCX before its end is read first.
        drive_ucx();
        if (reducer->alive && idle_link_stirred(reducer->fd.get())) lose(*reducer, "closed the connection");
        continue;
      }
      if (events[i].events & EPOLLOUT) write_some(*reducer);
    }
  }
}

}  // namespace collectives
