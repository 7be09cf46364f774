#include "communicator.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace collectives {

bool Work::wait_for(double seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!finished_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return done_; })) {
    return false;
  }
  if (error_) std::rethrow_exception(error_);
  return true;
}

bool Work::done() {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

void Work::finish(std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = true;
  error_ = error;
  finished_.notify_all();
}

Communicator::Communicator(int rank, int size, std::vector<std::vector<Link>> peer_links,
                           std::vector<std::string> peer_names, CommunicatorOptions options,
                           std::vector<Link> reducer_links, std::vector<std::string> reducer_names)
    : rank_(rank), size_(size), options_(options) {
  // The sockets were handed over: closed on every path.
  auto close_peer_sockets = [&] {
    for (auto& links : peer_links) {
      for (const Link& link : links) ::close(link.fd);
    }
  };
  std::string refused;
  if (!(options.timeout_seconds > 0)) refused = "timeout must be positive";
  if (options.reduction_server && reducer_links.empty()) {
    refused = "the reduction_server algorithm needs reducers";
  }
  if (!refused.empty()) {
    close_peer_sockets();
    for (const Link& link : reducer_links) ::close(link.fd);
    throw std::invalid_argument(refused);
  }
  if (!reducer_links.empty()) {
    const auto& settings = options.reduction_server_settings;
    try {
      reducers_ = std::make_unique<ReducerChannels>(
          std::move(reducer_links), std::move(reducer_names), default_inflight(settings),
          settings.heartbeat_timeout, [rank](const std::string& event) {
            std::fprintf(stderr, "[collectives rank %d] %s\n", rank, event.c_str());
          });
    } catch (...) {
      close_peer_sockets();
      throw;
    }
  }
  // It owns its sockets before anything in it can throw.
  transport_ = std::make_unique<TcpTransport>(rank, size, std::move(peer_links), std::move(peer_names));
  executor_ = std::thread([this] { execute_loop(); });
}

Communicator::~Communicator() { close(); }

std::shared_ptr<Work> Communicator::enqueue(Task task) {
  task.work = std::make_shared<Work>();
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) throw CollectiveError("the communicator is closed");
  task.tag.seq = next_seq_++;
  if (!failure_.empty()) {
    task.work->finish(std::make_exception_ptr(CollectiveError(
        task.tag.describe() + " on rank " + std::to_string(rank_) +
        ": the communicator was aborted by an earlier failure (" + failure_ +
        "); create a new one")));
    return task.work;
  }
  if (task.posted) task.reduction = reductions_enqueued_++;
  queue_.push_back(std::move(task));
  post_ahead_locked();
  queued_.notify_one();
  return queue_.back().work;
}

/*
 * Reduction i is assigned over the reducers that reduction i-2 ended with by agreement (all of
 * them for the first two). Every worker knows that set by the time it may post reduction i,
 * which is as soon as i-1 is running, since i-2 has then finished; so a worker posts one
 * reduction ahead, and every worker's chunks still go to the same reducers. A reducer that
 * failed meanwhile loses the chunks posted to it, and the reduction recovers them. A
 * reduction whose buffer an earlier unfinished collective reads or writes waits for it.
 */
void Communicator::post_ahead_locked() {
  if (!failure_.empty()) return;
  std::vector<MemoryRange> earlier = running_memory_;
  for (auto& task : queue_) {
    const bool clear = std::none_of(earlier.begin(), earlier.end(), [&](const MemoryRange& m) {
      return std::any_of(task.memory.begin(), task.memory.end(),
                         [&](const MemoryRange& mine) { return mine.overlaps(m); });
    });
    if (task.reduction >= 0 && !task.posted->posted) {
      if (task.reduction > reductions_finished_ + 1 || !clear) return;
      post_locked(task);
    }
    earlier.insert(earlier.end(), task.memory.begin(), task.memory.end());
  }
}

void Communicator::post_locked(Task& task) {
  std::vector<int> view;
  if (task.reduction < 2) {
    for (int r = 0; r < reducers_->count(); ++r) view.push_back(r);
  } else {
    view = views_.at(task.reduction - 2);
  }
  *task.posted = post_reduction_server(task.tag, *reducers_, options_.reduction_server_settings,
                                       view, task.data, task.tag.count);
}

void Communicator::execute_loop() {
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queued_.wait(lock, [&] { return closing_ || !queue_.empty(); });
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
      if (!failure_.empty()) {
        // Queued before the failure: it cannot run without the peers it lost.
        task.work->finish(std::make_exception_ptr(CollectiveError(
            task.tag.describe() + " on rank " + std::to_string(rank_) +
            ": the communicator was aborted by an earlier failure (" + failure_ + ")")));
        continue;
      }
      running_ = true;
      running_memory_ = task.memory;
      if (task.reduction >= 0 && !task.posted->posted) post_locked(task);
    }
    const std::string what = task.tag.describe();
    AlgorithmContext ctx{*transport_, task.tag, deadline_after(options_.timeout_seconds),
                         options_.segment_bytes, scratch_, options_.debug};
    std::exception_ptr error;
    try {
      ctx.log("start");
      task.run(ctx);
      ctx.log("done");
    } catch (const std::exception& e) {
      // The first failure aborts the communicator: the peers are told, and every collective
      // after this one fails at once instead of waiting on them. The transport lets go of
      // this collective's buffers before the caller hears of the failure.
      std::string message = what + " failed on rank " + std::to_string(rank_) + ": " + e.what();
      ctx.log(std::string("failed: ") + e.what());
      transport_->abort(e.what());
      transport_->quiesce();
      // The reducers hear why, and tell the other workers (which may be waiting on them).
      if (reducers_) reducers_->close(e.what());
      bool timed_out = dynamic_cast<const TimeoutError*>(&e) != nullptr;
      error = timed_out ? std::make_exception_ptr(TimeoutError(message))
                        : std::make_exception_ptr(CollectiveError(message));
      std::lock_guard<std::mutex> lock(mutex_);
      if (failure_.empty()) failure_ = message;
    }
    {
      // Not running any more before the caller wakes: a close() right after a collective
      // must not take it for one still in flight.
      std::lock_guard<std::mutex> lock(mutex_);
      running_ = false;
      running_memory_.clear();
      if (task.reduction >= 0 && !error) {
        views_[task.reduction] = task.posted->agreed;
        views_.erase(views_.begin(), views_.lower_bound(task.reduction - 1));
        reductions_finished_ = task.reduction + 1;
        post_ahead_locked();
      }
    }
    task.work->finish(error);
  }
}

namespace {

MemoryRange bytes_of(const void* data, size_t count, DataType dtype) {
  const char* begin = static_cast<const char*>(data);
  return {begin, begin + count * element_size(dtype)};
}

}  // namespace

std::shared_ptr<Work> Communicator::allreduce(void* data, size_t count, DataType dtype,
                                              ReduceOp op) {
  Task task;
  task.tag = {CollectiveKind::kAllreduce, 0, count, dtype, op};
  task.memory = {bytes_of(data, count, dtype)};
  if (options_.reduction_server) {
    ReducerChannels* reducers = reducers_.get();
    const ReductionServerSettings* settings = &options_.reduction_server_settings;
    auto posted = std::make_shared<PostedReduction>();
    task.posted = posted;
    task.data = data;
    task.run = [=](const AlgorithmContext& ctx) {
      finish_reduction_server(ctx, *reducers, *settings, *posted, data, count);
    };
  } else {
    task.run = [=](const AlgorithmContext& ctx) { allreduce_ring(ctx, data, count); };
  }
  return enqueue(std::move(task));
}

std::shared_ptr<Work> Communicator::allgather(const void* input, void* output, size_t count,
                                              DataType dtype) {
  Task task;
  task.tag = {CollectiveKind::kAllgather, 0, count, dtype, ReduceOp::kSum};
  task.memory = {bytes_of(input, count, dtype), bytes_of(output, count * size_, dtype)};
  task.run = [=](const AlgorithmContext& ctx) { allgather_ring(ctx, input, output, count); };
  return enqueue(std::move(task));
}

std::shared_ptr<Work> Communicator::broadcast(void* data, size_t count, DataType dtype, int root) {
  if (root < 0 || root >= size_) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not a rank of a " +
                                std::to_string(size_) + "-rank communicator");
  }
  Task task;
  task.tag = {CollectiveKind::kBroadcast, 0, count, dtype, ReduceOp::kSum, static_cast<uint32_t>(root)};
  task.memory = {bytes_of(data, count, dtype)};
  task.run = [=](const AlgorithmContext& ctx) { broadcast_chain(ctx, data, count, root); };
  return enqueue(std::move(task));
}

std::shared_ptr<Work> Communicator::reduce_scatter(const void* input, void* output, size_t count,
                                                   DataType dtype, ReduceOp op) {
  Task task;
  task.tag = {CollectiveKind::kReduceScatter, 0, count, dtype, op};
  task.memory = {bytes_of(input, count * size_, dtype), bytes_of(output, count, dtype)};
  task.run = [=](const AlgorithmContext& ctx) { reduce_scatter_ring(ctx, input, output, count); };
  return enqueue(std::move(task));
}

std::shared_ptr<Work> Communicator::barrier() {
  Task task;
  task.tag = {CollectiveKind::kBarrier, 0, 0, DataType::kUInt8, ReduceOp::kSum};
  task.run = [](const AlgorithmContext& ctx) { barrier_dissemination(ctx); };
  return enqueue(std::move(task));
}

std::vector<ReducerStat> Communicator::reducer_stats() const {
  return reducers_ ? reducers_->stats() : std::vector<ReducerStat>{};
}

void Communicator::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!transport_) return;  // closed already
  if (failure_.empty()) failure_ = reason;
  transport_->abort(reason);
  if (reducers_) reducers_->cancel(reason);
}

void Communicator::close() {
  std::deque<Task> abandoned;
  bool running;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) return;
    closing_ = true;
    running = running_;
    abandoned.swap(queue_);
    queued_.notify_one();
  }
  // A collective still in flight cannot finish without this rank: end it now, and let the
  // peers know why, rather than keep them waiting for their timeout.
  if (running) {
    const std::string reason =
        "rank " + std::to_string(rank_) + " closed its communicator during a collective";
    transport_->abort(reason);
    if (reducers_) reducers_->cancel(reason);
  }
  executor_.join();
  if (reducers_) {
    // Before the abandoned collectives fail: some may have been posted ahead, and their
    // buffers may be freed as soon as they fail. A goodbye tells the reducers that this
    // is no failure; otherwise they hear why, and tell the other workers.
    std::lock_guard<std::mutex> lock(mutex_);
    std::string failure = failure_;
    if (failure.empty() && (running || !abandoned.empty())) {
      failure = "rank " + std::to_string(rank_) + " closed its communicator with collectives unfinished";
    }
    reducers_->close(failure);
  }
  for (auto& task : abandoned) {
    task.work->finish(std::make_exception_ptr(
        CollectiveError(task.tag.describe() + ": the communicator was closed before it ran")));
  }
  std::unique_ptr<TcpTransport> transport;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    transport.swap(transport_);
  }
  transport.reset();  // says goodbye to the peers and closes the sockets
}

}  // namespace collectives
