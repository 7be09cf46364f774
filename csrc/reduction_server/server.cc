#include "reduction_server/server.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "common/error.h"
#include "kernels/reduce.h"
#include "reduction_server/heartbeat.h"
#include "transport/frame.h"
#include "transport/byte_stream.h"
#include "transport/frame_io.h"
#include "transport/socket.h"

namespace collectives {
namespace {

// Bytes read from one worker before the loop turns to the others.
constexpr uint64_t kFairnessBudget = 4 << 20;
constexpr int kAbortNoticeMillis = 1000;
// Elements summed per pass over the N contributions: the partial sum stays in cache while
// each contribution streams through it.
constexpr size_t kTileElements = 16 << 10;
// A worker that stops reading is still a worker; one whose link is cut is found by TCP
// keepalive after about kKeepIdle + kKeepCount * kKeepInterval seconds.
constexpr int kKeepIdle = 30, kKeepInterval = 5, kKeepCount = 3;
// Bytes of chunks one worker may have here when --max-memory is not given: two windows of
// the largest default chunks (4 x 4M each) fit four times over.
constexpr uint64_t kDefaultWorkerShare = 128 << 20;
// With workers over UCX: how long the loop sleeps on the UCX worker's descriptor alone while
// chunks are here or sums are being written, and while not (heartbeats are due only then).
constexpr int kUcxBusyMillis = 2, kUcxIdleMillis = 50;

// The job cannot go on; every worker is told `what`.
struct JobFailure {
  std::string what;
};

// One chunk (seq, group, unit) of one all-reduce, from its first contribution until every
// member of its group has its sum.
struct Slot {
  FrameHeader header;                          // as the first contribution announced it
  std::vector<std::unique_ptr<char[]>> parts;  // [worker]; the group's members' only
  int first = 0;                               // the group's lowest rank: parts[first] becomes the sum
  int expected = 0;                            // the group's members
  int workers = 0;                             // the job's workers (avg divides by them)
  int arrived = 0;                             // complete contributions
  int unanswered = 0;                          // workers whose copy of the sum is not yet written
  Clock::time_point since = Clock::now();      // when the first contribution began
  const char* sum() const { return parts[first].get(); }
};
using SlotKey = std::tuple<uint64_t, uint32_t, uint32_t>;  // (seq, group, unit)
SlotKey key_of(const FrameHeader& h) {
  // Copies first: a packed header's fields may not be bound to references.
  const uint64_t seq = h.seq;
  const uint32_t group = h.root, unit = h.unit;
  return {seq, group, unit};
}

struct OutFrame {
  FrameHeader header;
  std::shared_ptr<Slot> slot;  // the sum's owner, for data frames
  std::string text;            // the payload of a control frame
  const char* payload() const { return slot ? slot->sum() : text.data(); }
};

struct WorkerConnection {
  WorkerConnection(int rank, const Link& link, std::string name)
      : fd(link.fd), stream(std::make_unique<SocketStream>(link.fd)), rank(rank), name(std::move(name)),
        reader(receiving_protection(link)), writer(sending_protection(link)) {}
  FileDescriptor fd;  // the authenticated TCP link
  // What the frames go over: the link, or a UCX stream once the worker asked for one (its
  // kUcxAddress frame, the first on the link); the link then stays open, unwatched.
  std::unique_ptr<ByteStream> stream;
  int rank = 0;
  std::string name;
  FrameReader reader;
  std::shared_ptr<Slot> receiving;  // the slot whose payload is being read
  std::string abort_reason;       // the payload of a control frame being read (abort, goodbye, groups)
  std::deque<OutFrame> out;       // the front one is in the writer once started
  FrameWriter writer;
  uint64_t held = 0;  // bytes of its chunks here whose sum it has not fully received
  bool goodbye = false;
  bool declared = false;  // sent its kGroups frame
  bool closed = false;
  uint32_t interest = 0;
};

bool is_half(DataType dtype) {
  return dtype == DataType::kFloat16 || dtype == DataType::kBFloat16;
}

// Sums the group's contributions into parts[first], in worker-rank order: ((p0 + p1) + p2) +
// ... over the members for every element, whatever the tiling, so the result is the same bit
// for bit on every run, for every chunk size and every number of reducers. Avg divides by the
// job's workers: under the host plan each contribution is already a host's sum.
void sum_parts(Slot& slot, std::vector<float>& acc, std::vector<float>& widened) {
  const auto dtype = static_cast<DataType>(slot.header.dtype);
  const auto op = static_cast<ReduceOp>(slot.header.op);
  const size_t element = element_size(dtype);
  const size_t count = slot.header.nbytes / element;
  const int workers = slot.workers;
  std::vector<const char*> others;
  for (size_t w = slot.first + 1; w < slot.parts.size(); ++w) {
    if (slot.parts[w]) others.push_back(slot.parts[w].get());
  }
  char* sum = slot.parts[slot.first].get();
  for (size_t begin = 0; begin < count; begin += kTileElements) {
    const size_t n = std::min(kTileElements, count - begin);
    const size_t offset = begin * element;
    if (is_half(dtype)) {
      // float16/bfloat16: summed in float32 and rounded once at the end.
      acc.resize(kTileElements);
      widened.resize(kTileElements);
      widen(acc.data(), sum + offset, n, dtype);
      for (const char* part : others) {
        widen(widened.data(), part + offset, n, dtype);
        reduce_into(acc.data(), widened.data(), n, DataType::kFloat32, op);
      }
      if (op == ReduceOp::kAvg) divide(acc.data(), n, DataType::kFloat32, workers);
      narrow(sum + offset, acc.data(), n, dtype);
    } else {
      for (const char* part : others) reduce_into(sum + offset, part + offset, n, dtype, op);
      if (op == ReduceOp::kAvg) divide(sum + offset, n, dtype, workers);
    }
  }
  for (size_t w = slot.first + 1; w < slot.parts.size(); ++w) slot.parts[w].reset();
}

// Threads that sum complete slots while the event loop goes on moving bytes; a finished
// slot goes back to the loop through done() and a wake-up of its poller.
class SummingPool {
 public:
  SummingPool(int threads, Poller& poller) : poller_(poller) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~SummingPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    queued_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void submit(std::shared_ptr<Slot> slot) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      todo_.push_back(std::move(slot));
    }
    queued_.notify_one();
  }
  std::vector<std::shared_ptr<Slot>> done() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(done_, {});
  }

 private:
  void run() {
    std::vector<float> acc, widened;
    for (;;) {
      std::shared_ptr<Slot> slot;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        queued_.wait(lock, [&] { return stopping_ || !todo_.empty(); });
        if (stopping_) return;
        slot = std::move(todo_.front());
        todo_.pop_front();
      }
      sum_parts(*slot, acc, widened);  // headers were checked: dtype and op are valid
      {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.push_back(std::move(slot));
      }
      poller_.wake();
    }
  }

  Poller& poller_;
  std::mutex mutex_;
  std::condition_variable queued_;
  std::deque<std::shared_ptr<Slot>> todo_;
  std::vector<std::shared_ptr<Slot>> done_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace

struct ReductionServer::State {
  State(const std::vector<Link>& links, const std::vector<std::string>& names, ReducerOptions opts);
  void serve();
  void read_from(WorkerConnection& w);
  void on_header(WorkerConnection& w);
  void on_frame(WorkerConnection& w);
  void answer(const std::shared_ptr<Slot>& slot);
  void flush(WorkerConnection& w);
  void frame_written(WorkerConnection& w, const OutFrame& frame);
  void connection_lost(WorkerConnection& w, const std::string& why);
  void send_heartbeats();
  WaitingFor oldest_wait() const;
  void update_interest(WorkerConnection& w);
  void close(WorkerConnection& w);
  void tell_everyone(const std::string& reason);
  void take_groups(WorkerConnection& w);
  void switch_to_ucx(WorkerConnection& w);
  void drive_ucx();
  int ucx_sleep_millis();
  bool member(const WorkerConnection& w, const Slot& slot) const { return group_of[w.rank] == slot.header.root; }
  std::string describe_chunk(const FrameHeader& h) const;
  // What a chunk costs its sender's share of memory: its bytes and the slot's bookkeeping,
  // so that many tiny chunks cannot outgrow the bound either.
  uint64_t charge(const FrameHeader& h) const {
    return h.nbytes + sizeof(Slot) + workers.size() * sizeof(std::unique_ptr<char[]>) + 128;
  }

  const ReducerOptions options;
  std::unique_ptr<StreamWorker> ucx;  // made when the first worker asks for UCX; outlives the streams
  std::vector<WorkerConnection> workers;
  uint64_t per_worker_budget;
  Poller poller;
  std::unique_ptr<SummingPool> pool;
  std::map<SlotKey, std::shared_ptr<Slot>> filling;  // slots still missing contributions
  // Each worker's group, and each group's members (ascending): all one group until the
  // workers declare theirs (kGroups).
  std::vector<uint32_t> group_of;
  std::vector<std::vector<int>> members;
  std::string groups_from;  // the worker whose kGroups frame set them; empty: none did
  size_t unfinished = 0;  // slots created and not yet answered to every worker
  int open_connections = 0;
  std::string goodbye_from;  // the first worker that said goodbye
  std::string left_because;  // why a worker stopped using this reducer, if it said (a goodbye's text)
  std::atomic<bool> stop_requested{false};
  std::atomic<uint64_t> bytes_received{0}, bytes_sent{0}, chunks_reduced{0},
      elements_reduced{0};
  std::atomic<int> connected{0}, over_ucx{0};
  std::vector<char> sink;  // what is read and dropped after a failure (a UCX receive may be under way into it)
};

ReductionServer::State::State(const std::vector<Link>& links, const std::vector<std::string>& names,
                              ReducerOptions opts)
    : options(opts) {
  workers.reserve(links.size());  // the poller holds their addresses
  for (size_t k = 0; k < links.size(); ++k) {
    workers.emplace_back(static_cast<int>(k), links[k], k < names.size() ? names[k] : "worker " + std::to_string(k));
  }
  if (links.empty() || names.size() != links.size()) {
    throw std::invalid_argument("a reducer needs one socket and one name per worker");
  }
  // Each worker's chunks may take half of its share; the sums being written take the rest.
  per_worker_budget = options.max_memory_bytes
                          ? std::max<uint64_t>(1, options.max_memory_bytes / (2 * workers.size()))
                          : kDefaultWorkerShare;
  for (WorkerConnection& w : workers) {
    set_nonblocking(w.fd.get());
    set_keepalive(w.fd.get(), kKeepIdle, kKeepInterval, kKeepCount);
    update_interest(w);
  }
  open_connections = static_cast<int>(workers.size());
  connected = open_connections;
  group_of.assign(workers.size(), 0);
  members.assign(1, {});
  for (const WorkerConnection& w : workers) members[0].push_back(w.rank);
  int threads = options.threads > 0
                    ? options.threads
                    : static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 4u));
  pool = std::make_unique<SummingPool>(threads, poller);
}

std::string ReductionServer::State::describe_chunk(const FrameHeader& h) const {
  return "chunk " + std::to_string(h.unit) + " (" + std::to_string(h.nbytes) + " bytes) of " +
         describe(h);
}

void ReductionServer::State::update_interest(WorkerConnection& w) {
  // Over UCX, the link is watched only for its end: it ends the moment the worker's process does.
  uint32_t wanted = 0;
  if (!w.closed) {
    wanted |= EPOLLIN;
    if (w.stream->poll_fd() >= 0 && !w.out.empty()) wanted |= EPOLLOUT;
  }
  w.interest = poller.watch(w.fd.get(), w.interest, wanted, &w);
}

void ReductionServer::State::close(WorkerConnection& w) {
  if (w.closed) return;
  w.closed = true;
  update_interest(w);
  w.stream.reset();  // first: a UCX send under way may still read a frame of `out`
  w.out.clear();
  w.fd.reset();
  --open_connections;
  connected = open_connections;
}

void ReductionServer::State::serve() {
  const int heartbeat_millis =
      std::max(1, static_cast<int>(options.heartbeat_interval_seconds * 1000));
  Deadline next_heartbeat = deadline_after(options.heartbeat_interval_seconds);
  std::vector<epoll_event> events(workers.size() + 1);
  int sleep_millis = heartbeat_millis;
  while (open_connections > 0) {
    bool woken;
    int n = poller.wait(events.data(), static_cast<int>(events.size()), sleep_millis, &woken);
    if (n < 0 && errno != EINTR) throw std::runtime_error("epoll_wait: " + errno_text(errno));
    if (stop_requested) {
      for (auto& w : workers) close(w);
      return;
    }
    if (woken) {
      for (auto& slot : pool->done()) answer(slot);
    }
    for (int i = 0; i < n; ++i) {
      if (events[i].data.ptr == this) continue;  // the UCX worker's descriptor: driven below
      auto* w = static_cast<WorkerConnection*>(events[i].data.ptr);
      if (w->closed) continue;
      if (w->stream->poll_fd() < 0) {
        // Its link over UCX stirred: what it sent over UCX before its end is read first.
        drive_ucx();
        if (!w->closed && idle_link_stirred(w->fd.get())) connection_lost(*w, "closed its connection");
        continue;
      }
      if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) read_from(*w);
      if (!w->closed && (events[i].events & EPOLLOUT)) flush(*w);
    }
    if (ucx) drive_ucx();
    if (Clock::now() >= next_heartbeat) {
      send_heartbeats();
      next_heartbeat = deadline_after(options.heartbeat_interval_seconds);
    }
    sleep_millis = ucx ? ucx_sleep_millis() : heartbeat_millis;
  }
}

// Every stream over UCX is tried on each turn: they share the UCX worker's one descriptor.
void ReductionServer::State::drive_ucx() {
  ucx->progress();
  for (auto& w : workers) {
    if (w.closed || w.stream->poll_fd() >= 0) continue;
    read_from(w);
    if (!w.closed) flush(w);
  }
}

int ReductionServer::State::ucx_sleep_millis() {
  if (!ucx->arm()) return 0;  // events came meanwhile
  const bool busy = std::any_of(workers.begin(), workers.end(), [](const WorkerConnection& w) {
    return !w.closed && w.stream->poll_fd() < 0 && (w.held > 0 || !w.out.empty());
  });
  return busy ? kUcxBusyMillis : kUcxIdleMillis;
}

/*
 * A worker's kUcxAddress frame (in w.abort_reason), the first on its authenticated link: it
 * moves its frames to a UCX stream. This reducer answers with its own address, the last frame
 * on the link, and reads and writes that worker's frames over UCX from then on: the frames go
 * on with the same protection and count, so none can be dropped or replayed across the switch.
 */
void ReductionServer::State::switch_to_ucx(WorkerConnection& w) {
  if (w.stream->poll_fd() < 0 || w.held > 0 || w.declared) {
    throw JobFailure{w.name + " asked for UCX after its first frame"};
  }
  std::unique_ptr<ByteStream> stream;
  try {
    if (!ucx) {
      ucx = make_ucx_stream_worker(options.ucx_library);
      poller.watch(ucx->fd(), 0, EPOLLIN, this);
    }
    stream = ucx->connect(w.abort_reason, w.name);
  } catch (const CollectiveError& e) {
    throw JobFailure{w.name + " runs over UCX (COLLECTIVES_TRANSPORT=ucx), but this reducer cannot: " + e.what()};
  }
  FrameHeader reply;
  reply.kind = static_cast<uint8_t>(FrameKind::kUcxAddress);
  reply.nbytes = ucx->address().size();
  if (!write_frame(*w.stream, w.writer, reply, ucx->address(), deadline_after(kAbortNoticeMillis / 1000.0))) {
    return connection_lost(w, "did not take this reducer's UCX address (" + errno_text(errno) + ")");
  }
  w.stream = std::move(stream);
  update_interest(w);
  ++over_ucx;
}

void ReductionServer::State::read_from(WorkerConnection& w) {
  uint64_t budget = kFairnessBudget;
  while (budget > 0 && !w.closed) {
    ssize_t n = w.stream->read_some(w.reader.next(), w.reader.wanted(budget));
    if (n == 0) return connection_lost(w, "closed its connection");
    if (n < 0) {
      if (would_block(errno)) return;
      return connection_lost(w, "lost its connection (" + errno_text(errno) + ")");
    }
    bytes_received += n;
    budget -= std::min<uint64_t>(budget, n);
    switch (w.reader.advance(n)) {
      case FrameReader::Event::kHeader:
        try {
          on_header(w);
        } catch (JobFailure& failure) {
          if (w.reader.checks() && !failure.what.empty()) failure.what += kUncheckedHeader;
          throw;
        }
        break;
      case FrameReader::Event::kFrame: on_frame(w); break;
      case FrameReader::Event::kNone: break;
    }
  }
}

void ReductionServer::State::on_header(WorkerConnection& w) {
  const FrameHeader& h = w.reader.header();
  if (h.magic != kFrameMagic || h.version != kProtocolVersion) {
    throw JobFailure{w.name + " sent a frame that is not collectives protocol " +
                     std::to_string(kProtocolVersion) + " (a corrupted stream, or another version)"};
  }
  w.receiving.reset();
  switch (static_cast<FrameKind>(h.kind)) {
    case FrameKind::kHeartbeat:
    case FrameKind::kGoodbye:
    case FrameKind::kAbort:
    case FrameKind::kGroups:
    case FrameKind::kUcxAddress:
      // Control frames are acted on once whole and checked (on_frame).
      if (static_cast<FrameKind>(h.kind) == FrameKind::kGroups       ? h.nbytes != 4 * workers.size()
          : static_cast<FrameKind>(h.kind) == FrameKind::kUcxAddress ? h.nbytes == 0 || h.nbytes > kMaxUcxAddress
                                                                     : h.nbytes > kMaxAbortReason) {
        throw JobFailure{w.name + " sent a control frame of " + std::to_string(h.nbytes) + " bytes"};
      }
      w.abort_reason.assign(h.nbytes, '\0');
      if (w.reader.read_payload_into(w.abort_reason.data())) on_frame(w);
      return;
    case FrameKind::kData:
      break;
    default:
      throw JobFailure{w.name + " sent a frame of unknown kind " + std::to_string(h.kind)};
  }
  if (h.collective != static_cast<uint8_t>(CollectiveKind::kAllreduce) ||
      h.dtype >= kNumDataTypes || h.op >= kNumReduceOps) {
    throw JobFailure{w.name + " sent " + describe(h) + ", which reducers do not serve"};
  }
  const auto dtype = static_cast<DataType>(h.dtype);
  const size_t element = element_size(dtype);
  if (h.nbytes == 0 || h.nbytes % element != 0 || h.nbytes / element > h.count ||
      (static_cast<ReduceOp>(h.op) == ReduceOp::kAvg && !is_floating(dtype))) {
    throw JobFailure{w.name + " sent a malformed " + describe_chunk(h)};
  }
  /*
   * A worker holds at most two all-reduces' windows of chunks here (one posted ahead), so one
   * within its window never reaches its share with sane settings. Beyond it the job stops
   * with the reason rather than the reducer growing; it does not stop reading instead, since
   * the chunks behind may be the ones every worker needs first. nbytes is compared alone
   * first: near 2^64, charge() would wrap around to a small number.
   */
  if (h.nbytes > per_worker_budget || w.held + charge(h) > per_worker_budget) {
    throw JobFailure{w.name + " has more than " + std::to_string(per_worker_budget) +
                     " bytes of chunks at this reducer (its share of --max-memory over " +
                     std::to_string(workers.size()) + " workers): lower COLLECTIVES_RS_CHUNK_BYTES " +
                     "or COLLECTIVES_RS_INFLIGHT, or start the reducers with more --max-memory"};
  }
  if (!goodbye_from.empty()) {
    throw JobFailure{""};  // data after a goodbye: the workers are giving this reducer up
  }
  if (!groups_from.empty() && !w.declared) {
    throw JobFailure{w.name + " sent data without saying which workers share its chunks, where " + groups_from +
                     " did (the host plan): the workers run different versions or settings"};
  }
  if (h.root != group_of[w.rank]) {
    throw JobFailure{w.name + " sent " + describe_chunk(h) + " for group " + std::to_string(h.root) +
                     ", but belongs to group " + std::to_string(group_of[w.rank])};
  }
  auto& slot = filling[key_of(h)];
  if (!slot) {
    slot = std::make_shared<Slot>();
    slot->header = h;
    slot->parts.resize(workers.size());
    slot->first = members[h.root].front();
    slot->expected = static_cast<int>(members[h.root].size());
    slot->workers = static_cast<int>(workers.size());
    ++unfinished;
  } else {
    const FrameHeader& first = slot->header;
    if (first.count != h.count || first.dtype != h.dtype || first.op != h.op ||
        first.nbytes != h.nbytes) {
      throw JobFailure{"workers disagree on " + describe(first) + ": " + w.name + " sent " +
                       describe_chunk(h) + " where another sent " + describe_chunk(first) +
                       "; every worker must call the same all-reduces in the same order with "
                       "the same length, dtype and op"};
    }
    if (slot->parts[w.rank]) {
      throw JobFailure{w.name + " sent " + describe_chunk(h) + " twice"};
    }
  }
  slot->parts[w.rank].reset(new char[h.nbytes]);
  w.reader.read_payload_into(slot->parts[w.rank].get());  // nbytes > 0, checked above
  w.receiving = slot;
  w.held += charge(h);
}

void ReductionServer::State::on_frame(WorkerConnection& w) {
  // Nothing of a frame counts before its tag is checked: a contribution joins a sum only then.
  if (!w.reader.authentic()) {
    throw JobFailure{w.name + "'s frame failed its integrity check at this reducer (COLLECTIVES_WIRE_SECURITY=" +
                     std::string(to_string(w.reader.security())) + "): it was altered on the way, or " +
                     "injected by someone other than " + w.name};
  }
  const auto kind = static_cast<FrameKind>(w.reader.header().kind);
  w.reader.next_frame();
  if (kind == FrameKind::kHeartbeat) return;
  if (kind == FrameKind::kUcxAddress) return switch_to_ucx(w);
  if (kind == FrameKind::kGoodbye) {
    w.goodbye = true;
    if (goodbye_from.empty()) goodbye_from = w.name;
    /*
     * A goodbye that says why, or one while chunks are pending here, means the workers gave
     * this reducer up (they drop a reducer together): it serves the job no longer, and must
     * not wait for the workers it is cut off from, whose goodbyes cannot come.
     */
    if (!w.abort_reason.empty() || unfinished > 0) {
      if (left_because.empty()) left_because = w.abort_reason;
      throw JobFailure{""};
    }
    // It sends nothing more and is owed nothing: done with (the end of its stream need not
    // be waited for, which a UCX stream does not announce).
    return close(w);
  }
  if (kind == FrameKind::kAbort) throw JobFailure{w.name + " aborted the job: " + w.abort_reason};
  if (kind == FrameKind::kGroups) return take_groups(w);
  std::shared_ptr<Slot> slot = std::move(w.receiving);
  if (++slot->arrived < slot->expected) return;
  filling.erase(key_of(slot->header));
  pool->submit(std::move(slot));
}

void ReductionServer::State::answer(const std::shared_ptr<Slot>& slot) {
  ++chunks_reduced;
  elements_reduced += slot->header.nbytes / element_size(static_cast<DataType>(slot->header.dtype));
  if (options.debug) {
    std::cerr << "[collectives reducer] summed " + describe_chunk(slot->header) + "\n";
  }
  for (auto& w : workers) {
    if (w.closed || !member(w, *slot)) continue;
    ++slot->unanswered;
    w.out.push_back(OutFrame{slot->header, slot, ""});
  }
  if (slot->unanswered == 0) --unfinished;
  for (auto& w : workers) {
    if (!w.closed) flush(w);
  }
}

void ReductionServer::State::flush(WorkerConnection& w) {
  while (!w.out.empty()) {
    if (!w.writer.busy()) w.writer.start(w.out.front().header, w.out.front().payload());
    ssize_t n = w.writer.write_some(*w.stream);
    if (n < 0) return connection_lost(w, "lost its connection (" + errno_text(errno) + ")");
    if (n == 0) break;
    bytes_sent += n;
    if (!w.writer.done()) continue;
    OutFrame written = std::move(w.out.front());
    w.out.pop_front();
    frame_written(w, written);
  }
  update_interest(w);
}

void ReductionServer::State::frame_written(WorkerConnection& w, const OutFrame& frame) {
  if (!frame.slot) return;
  w.held -= charge(frame.header);
  if (--frame.slot->unanswered == 0) --unfinished;
}

void ReductionServer::State::connection_lost(WorkerConnection& w, const std::string& why) {
  if (w.goodbye) return close(w);
  throw JobFailure{w.name + " " + why + " without saying goodbye: it died, or its link failed"};
}

void ReductionServer::State::send_heartbeats() {
  // Only to workers with chunks here: those are waiting on this reducer, and hear what for.
  const WaitingFor waits = oldest_wait();
  const FrameHeader beat = waits.header();
  const std::string text = waits.payload();
  for (auto& w : workers) {
    if (w.closed || w.held == 0 || !w.out.empty()) continue;
    w.out.push_back(OutFrame{beat, nullptr, text});
    flush(w);
  }
}

// The oldest chunk still missing contributions, and whose: a worker that has not sent it, or
// is still sending it.
WaitingFor ReductionServer::State::oldest_wait() const {
  WaitingFor waits;
  if (filling.empty()) return waits;
  const Slot& slot = *filling.begin()->second;
  waits.chunk = slot.header;
  waits.seconds = std::chrono::duration<double>(Clock::now() - slot.since).count();
  for (const WorkerConnection& w : workers) {
    if (!member(w, slot) || (slot.parts[w.rank] && w.receiving.get() != &slot)) continue;
    if (++waits.missing <= WaitingFor::kNamedRanks) waits.ranks.push_back(static_cast<uint32_t>(w.rank));
  }
  return waits;
}

/*
 * A worker's kGroups frame (in w.abort_reason): the group of every worker. The first one sets
 * them, before any chunk came (each worker sends it ahead of its data); every later one must
 * say the same, so that no sum takes a contribution the workers did not mean.
 */
void ReductionServer::State::take_groups(WorkerConnection& w) {
  const size_t n = workers.size();
  std::vector<uint32_t> groups(n);
  for (size_t k = 0; k < n; ++k) {
    const auto* b = reinterpret_cast<const unsigned char*>(w.abort_reason.data()) + 4 * k;
    groups[k] = b[0] | b[1] << 8 | b[2] << 16 | static_cast<uint32_t>(b[3]) << 24;
  }
  if (w.declared) throw JobFailure{w.name + " said twice which workers share its chunks"};
  w.declared = true;
  if (!groups_from.empty()) {
    if (groups != group_of) {
      throw JobFailure{w.name + " groups the workers otherwise than " + groups_from +
                       " does: the workers disagree on the host plan (their topologies differ)"};
    }
    return;
  }
  if (unfinished > 0 || chunks_reduced > 0) {
    throw JobFailure{w.name + " said which workers share its chunks after others had sent data without: the "
                              "workers disagree on the plan (different versions or settings)"};
  }
  std::vector<std::vector<int>> by_group;
  for (size_t k = 0; k < n; ++k) {
    if (groups[k] >= n) throw JobFailure{w.name + " named group " + std::to_string(groups[k]) + " of " + std::to_string(n) + " workers"};
    if (by_group.size() <= groups[k]) by_group.resize(groups[k] + 1);
    by_group[groups[k]].push_back(static_cast<int>(k));
  }
  for (size_t g = 0; g < by_group.size(); ++g) {
    if (by_group[g].empty()) throw JobFailure{w.name + " left group " + std::to_string(g) + " without members"};
  }
  group_of = std::move(groups);
  members = std::move(by_group);
  groups_from = w.name;
}

void ReductionServer::State::tell_everyone(const std::string& reason) {
  FrameHeader notice;
  notice.kind = static_cast<uint8_t>(FrameKind::kAbort);
  const std::string text = reason.substr(0, kMaxAbortReason);
  notice.nbytes = text.size();
  for (auto& w : workers) {
    if (w.closed) continue;
    // Only between frames: in the middle of one, the notice would corrupt the stream, and
    // the end of the connection tells the worker enough.
    if (!w.writer.mid_frame()) {
      w.writer.discard();
      write_frame(*w.stream, w.writer, notice, text, deadline_after(kAbortNoticeMillis / 1000.0));
    }
    w.stream->end_writes();
  }
  // Closing with unread data would reset the connections, and a reset can destroy the notice
  // before the worker reads it: read (and drop) what they still send until they close.
  Deadline until = deadline_after(kAbortNoticeMillis / 1000.0);
  sink.resize(64 << 10);
  for (auto& w : workers) {
    while (!w.closed && Clock::now() < until) {
      ssize_t n = w.stream->read_some(sink.data(), sink.size());
      if (n == 0 || (n < 0 && !would_block(errno))) break;
      if (n < 0) w.stream->wait(POLLIN, 10);
    }
  }
}

ReductionServer::ReductionServer(std::vector<Link> worker_links, std::vector<std::string> worker_names,
                                 ReducerOptions options)
    : state_(std::make_unique<State>(worker_links, worker_names, options)) {}

ReductionServer::~ReductionServer() = default;

void ReductionServer::serve() {
  try {
    state_->serve();
  } catch (const JobFailure& failure) {
    if (failure.what.empty()) {
      // The workers gave this reducer up (took it for dead): closing every connection makes
      // those still waiting on it move its chunks to the other reducers now.
      for (auto& w : state_->workers) state_->close(w);
      const std::string& why = state_->left_because;
      throw CollectiveError(state_->goodbye_from + " stopped using this reducer" +
                            (why.empty() ? " while it still had work here: the workers took it for dead (their "
                                           "logs say why)"
                                         : ": " + why));
    }
    state_->tell_everyone(failure.what);
    for (auto& w : state_->workers) state_->close(w);
    throw CollectiveError(failure.what);
  }
}

void ReductionServer::stop() {
  state_->stop_requested = true;
  state_->poller.wake();
}

ReducerStats ReductionServer::stats() const {
  ReducerStats s;
  s.bytes_received = state_->bytes_received;
  s.bytes_sent = state_->bytes_sent;
  s.chunks_reduced = state_->chunks_reduced;
  s.elements_reduced = state_->elements_reduced;
  s.workers_connected = state_->connected;
  s.workers_over_ucx = state_->over_ucx;
  return s;
}

}  // namespace collectives
