#include "communicator.h"

#include <unistd.h>

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

Communicator::Communicator(int rank, int size, std::vector<std::vector<int>> peer_fds,
                           std::vector<std::string> peer_names, CommunicatorOptions options,
                           std::vector<int> reducer_fds, std::vector<std::string> reducer_names)
    : rank_(rank), size_(size), options_(options) {
  // The sockets were handed over: owned from here on, whatever fails below.
  if (!reducer_fds.empty()) {
    const auto& settings = options.reduction_server_settings;
    reducers_ = std::make_unique<ReducerChannels>(
        std::move(reducer_fds), std::move(reducer_names), default_inflight(settings),
        settings.heartbeat_timeout, [rank](const std::string& event) {
          std::fprintf(stderr, "[collectives rank %d] %s\n", rank, event.c_str());
        });
  }
  if (!(options.timeout_seconds > 0)) {
    for (auto& fds : peer_fds) {
      for (int fd : fds) ::close(fd);
    }
    throw std::invalid_argument("timeout must be positive");
  }
  if (options.reduction_server && !reducers_) {
    for (auto& fds : peer_fds) {
      for (int fd : fds) ::close(fd);
    }
    throw std::invalid_argument("the reduction_server algorithm needs reducers");
  }
  transport_ = std::make_unique<TcpTransport>(rank, size, std::move(peer_fds), std::move(peer_names));
  executor_ = std::thread([this] { execute_loop(); });
}

Communicator::~Communicator() { close(); }

std::shared_ptr<Work> Communicator::enqueue(CollectiveTag tag,
                                            std::function<void(const AlgorithmContext&)> run,
                                            PostFunction post) {
  auto work = std::make_shared<Work>();
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) throw CollectiveError("the communicator is closed");
  tag.seq = next_seq_++;
  if (!failure_.empty()) {
    work->finish(std::make_exception_ptr(CollectiveError(
        tag.describe() + " on rank " + std::to_string(rank_) +
        ": the communicator was aborted by an earlier failure (" + failure_ +
        "); create a new one")));
    return work;
  }
  Task task;
  task.tag = tag;
  task.run = std::move(run);
  task.work = work;
  if (post) {
    task.reduction = reductions_enqueued_++;
    task.post = std::move(post);
  }
  queue_.push_back(std::move(task));
  post_ahead_locked();
  queued_.notify_one();
  return work;
}

/*
 * Reduction i is assigned over the reducers alive after reduction i-2 (all of them for the
 * first two). Every worker knows that set by the time it may post reduction i, which is as
 * soon as i-1 is running, since i-2 has then finished with an agreement; so a worker posts
 * one reduction ahead, and every worker's chunks still go to the same reducers. A reducer
 * that failed meanwhile loses the chunks posted to it, and the reduction recovers them.
 */
void Communicator::post_ahead_locked() {
  for (auto& task : queue_) {
    if (task.reduction < 0 || task.posted) continue;
    if (task.reduction > reductions_finished_ + 1) return;
    post_locked(task);
  }
}

void Communicator::post_locked(Task& task) {
  std::vector<int> view;
  if (task.reduction < 2) {
    for (int r = 0; r < reducers_->count(); ++r) view.push_back(r);
  } else {
    view = views_.at(task.reduction - 2);
  }
  task.post(task.tag, view);
  task.posted = true;
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
      running_ = true;
      if (task.reduction >= 0 && !task.posted && failure_.empty()) post_locked(task);
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
      // Ending the reducers' connections without goodbye makes them tell the other workers.
      if (reducers_) reducers_->close(false);
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
      if (task.reduction >= 0 && !error) {
        views_[task.reduction] = reducers_->alive();
        views_.erase(views_.begin(), views_.lower_bound(task.reduction - 1));
        reductions_finished_ = task.reduction + 1;
        post_ahead_locked();
      }
    }
    task.work->finish(error);
  }
}

std::shared_ptr<Work> Communicator::allreduce(void* data, size_t count, DataType dtype,
                                              ReduceOp op) {
  if (options_.reduction_server) {
    ReducerChannels* reducers = reducers_.get();
    const ReductionServerSettings* settings = &options_.reduction_server_settings;
    auto posted = std::make_shared<PostedReduction>();
    return enqueue(
        {CollectiveKind::kAllreduce, 0, count, dtype, op},
        [=](const AlgorithmContext& ctx) {
          finish_reduction_server(ctx, *reducers, *settings, *posted, data, count);
        },
        [=](const CollectiveTag& tag, const std::vector<int>& view) {
          *posted = post_reduction_server(tag, *reducers, *settings, view, data, count);
        });
  }
  return enqueue({CollectiveKind::kAllreduce, 0, count, dtype, op},
                 [=](const AlgorithmContext& ctx) { allreduce_ring(ctx, data, count); });
}

std::shared_ptr<Work> Communicator::allgather(const void* input, void* output, size_t count,
                                              DataType dtype) {
  return enqueue({CollectiveKind::kAllgather, 0, count, dtype, ReduceOp::kSum},
                 [=](const AlgorithmContext& ctx) { allgather_ring(ctx, input, output, count); });
}

std::shared_ptr<Work> Communicator::broadcast(void* data, size_t count, DataType dtype, int root) {
  if (root < 0 || root >= size_) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not a rank of a " +
                                std::to_string(size_) + "-rank communicator");
  }
  return enqueue({CollectiveKind::kBroadcast, 0, count, dtype, ReduceOp::kSum,
                  static_cast<uint32_t>(root)},
                 [=](const AlgorithmContext& ctx) { broadcast_chain(ctx, data, count, root); });
}

std::shared_ptr<Work> Communicator::reduce_scatter(const void* input, void* output, size_t count,
                                                   DataType dtype, ReduceOp op) {
  return enqueue({CollectiveKind::kReduceScatter, 0, count, dtype, op},
                 [=](const AlgorithmContext& ctx) {
                   reduce_scatter_ring(ctx, input, output, count);
                 });
}

std::shared_ptr<Work> Communicator::barrier() {
  return enqueue({CollectiveKind::kBarrier, 0, 0, DataType::kUInt8, ReduceOp::kSum},
                 [](const AlgorithmContext& ctx) { barrier_dissemination(ctx); });
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
    // is no failure.
    std::lock_guard<std::mutex> lock(mutex_);
    reducers_->close(failure_.empty() && !running && abandoned.empty());
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
