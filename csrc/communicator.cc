#include "communicator.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <utility>

#include "common/fnv.h"

namespace collectives {

bool Work::wait_for(double seconds) {
  if (message_) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (done_) {
        if (error_) std::rethrow_exception(error_);
        return true;
      }
    }
    // The transport's own wait: woken by the request's completion, or by a failure.
    std::exception_ptr error;
    try {
      std::shared_ptr<Transport> transport = message_->transport.lock();
      if (!transport) throw CollectiveError("the communicator was closed before the message was done");
      const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
      if (!transport->wait_until(message_->request, message_->deadline, until)) return false;
      const TransportRequest& request = message_->request;
      if (request->from_any_source()) {  // the sender, now that it is known: its rank here
        const auto& members = message_->members;
        source_ = static_cast<int>(std::find(members.begin(), members.end(), request->peer) - members.begin());
      }
    } catch (const TimeoutError& e) {
      error = std::make_exception_ptr(
          TimeoutError(message_->what + " failed on rank " + std::to_string(message_->rank) + ": " + e.what()));
    } catch (const CollectiveError& e) {
      error = std::make_exception_ptr(
          CollectiveError(message_->what + " failed on rank " + std::to_string(message_->rank) + ": " + e.what()));
    }
    finish(error);
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (!finished_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return done_; })) {
    return false;
  }
  if (error_) std::rethrow_exception(error_);
  return true;
}

bool Work::done() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_ || !message_) return done_;
  }
  try {
    return wait_for(0);
  } catch (const CollectiveError&) {
    return true;  // done, badly: wait() says how
  }
}

void Work::when_done(std::function<void(std::exception_ptr)> callback) {
  if (message_) throw std::logic_error("Work::when_done is for collectives, not messages");
  std::unique_lock<std::mutex> lock(mutex_);
  if (!done_) {
    callbacks_.push_back(std::move(callback));
    return;
  }
  std::exception_ptr error = error_;
  lock.unlock();
  callback(error);
}

void Work::finish(std::exception_ptr error) {
  std::vector<std::function<void(std::exception_ptr)>> callbacks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_) return;  // a message may be waited on by several threads
    done_ = true;
    error_ = error;
    callbacks.swap(callbacks_);
    finished_.notify_all();
  }
  for (auto& callback : callbacks) {
    // One that throws must neither skip the others nor end the thread finishing the work.
    try {
      callback(error);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "collectives: a when_done callback threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "collectives: a when_done callback threw\n");
    }
  }
}

void InputGate::open(std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (open_) return;
  open_ = true;
  error_ = error;
  opened_.notify_all();
}

bool InputGate::is_open() {
  std::lock_guard<std::mutex> lock(mutex_);
  return open_;
}

void InputGate::wait(Deadline deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!opened_.wait_until(lock, deadline, [&] { return open_; })) {
    throw TimeoutError("its input was not ready (the copy into host memory did not finish) before the deadline");
  }
  if (error_) std::rethrow_exception(error_);
}

Communicator::Communicator(std::unique_ptr<Transport> transport, CommunicatorOptions options,
                           std::vector<Link> reducer_links, std::vector<std::string> reducer_names,
                           bool board_expected, std::unique_ptr<ShmBoard> board)
    : options_(options),
      transport_(std::move(transport)),
      lineage_(std::make_shared<Lineage>()),
      group_(Group::world(transport_->size(), transport_->rank())),
      id_(0),
      board_(std::move(board)) {
  std::string refused;
  if (!(options.timeout_seconds > 0)) refused = "timeout must be positive";
  if (options.reduction_server && reducer_links.empty()) {
    refused = "the reduction_server algorithm needs reducers";
  }
  if (board_ && (board_->ranks() != members() || board_->me() != rank())) {
    refused = "the shared board's members are not the communicator's ranks";
  }
  try {
    make_hierarchical();
  } catch (const std::invalid_argument& e) {
    refused = e.what();
  }
  if (!refused.empty()) {
    for (const Link& link : reducer_links) ::close(link.fd);
    throw std::invalid_argument(refused);
  }
  if (board_expected) {
    // Never the reduction server: where it serves, the board is not chosen (nor this).
    board_allreduce_ = std::make_unique<BoardAllreduce>(
        board_.get(), [this](const AlgorithmContext& ctx, void* data, size_t count) {
          choose_allreduce(count, ctx.tag.dtype, /*with_board=*/false).call(ctx.tag, data)->run(ctx);
        });
  }
  if (!reducer_links.empty()) {
    reduction_server_ = std::make_unique<ReductionServerAllreduce>(
        std::move(reducer_links), std::move(reducer_names), options.reduction_server_settings, group_);
  }
  executor_ = std::thread([this] { execute_loop(); });
}

Communicator::Communicator(std::shared_ptr<Transport> transport, std::shared_ptr<Lineage> lineage, Group group,
                           uint64_t id, CommunicatorOptions options)
    : options_(options), transport_(std::move(transport)), lineage_(std::move(lineage)), group_(std::move(group)), id_(id) {
  make_hierarchical();
  executor_ = std::thread([this] { execute_loop(); });
}

Communicator::~Communicator() { close(); }

Hierarchy* Communicator::hierarchical_for(CollectiveKind kind, size_t count, DataType dtype) {
  const bool pays = select_hierarchical(kind, hierarchy_.get(), count * element_size(dtype), size(), options_.cost);
  return pays ? hierarchy_.get() : nullptr;
}

void Communicator::make_hierarchical() {
  if (options_.hierarchy.levels.empty()) return;
  hierarchy_ = std::make_unique<Hierarchy>(options_.hierarchy, group_);
  hierarchical_ = std::make_unique<HierarchicalAllreduce>(*hierarchy_);
}

AllreduceAlgorithm& Communicator::choose_allreduce(size_t count, DataType dtype, bool with_board) {
  BoardAllreduce* board =
      with_board && board_allreduce_ && board_allreduce_->may_serve() ? board_allreduce_.get() : nullptr;
  return select_allreduce({ring_, recursive_doubling_, options_.reduction_server ? reduction_server_.get() : nullptr,
                           hierarchical_.get(), board, options_.board_up_to_bytes},
                          count, dtype, size(), options_.cost);
}

std::vector<int> Communicator::members() const {
  std::vector<int> ranks(size());
  for (int i = 0; i < size(); ++i) ranks[i] = group_.peer(i);
  return ranks;
}

std::unique_ptr<Communicator> Communicator::subgroup(const std::vector<int>& ranks, std::optional<CostModel> cost,
                                                   HierarchyPlan hierarchy) {
  const std::vector<int> mine = members();
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (std::find(mine.begin(), mine.end(), ranks[i]) == mine.end()) {
      throw std::invalid_argument("rank " + std::to_string(ranks[i]) + " is not a member of this communicator");
    }
    if (std::find(ranks.begin(), ranks.begin() + i, ranks[i]) != ranks.begin() + i) {
      throw std::invalid_argument("rank " + std::to_string(ranks[i]) + " is listed twice");
    }
  }
  Group group(ranks, group_.peer(group_.index()));  // throws if this rank is not one of `ranks`
  std::shared_ptr<Transport> transport;
  uint64_t made;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!transport_) throw CollectiveError("the communicator is closed");
    transport = transport_;
    std::lock_guard<std::mutex> counting(lineage_->mutex);
    made = lineage_->made[ranks]++;
  }
  // FNV-1a over the ranks and the count: the same on every member; 0 is the world's.
  std::vector<uint64_t> identity(ranks.begin(), ranks.end());
  identity.push_back(made);
  uint64_t id = fnv1a(identity);
  if (id == 0) id = 1;
  CommunicatorOptions options = options_;
  options.reduction_server = false;
  if (cost) options.cost = *cost;
  options.hierarchy = std::move(hierarchy);
  return std::unique_ptr<Communicator>(new Communicator(std::move(transport), lineage_, std::move(group), id, options));
}

std::shared_ptr<Work> Communicator::enqueue(Task task, Interruption* caller) {
  task.work = std::make_shared<Work>();
  std::unique_lock<std::mutex> lock(mutex_);
  if (closing_) throw CollectiveError("the communicator is closed");
  if (caller && running_ && caller_thread_ == std::this_thread::get_id()) {
    // From inside the collective this thread runs (a signal handler): it would wait on itself.
    throw CollectiveError("a collective was called while this thread runs another of the same communicator "
                          "(from a signal handler?); call it once that one has returned");
  }
  task.tag.seq = next_seq_++;
  task.tag.comm = id_;
  if (!failure_.empty()) {
    task.work->finish(aborted_earlier_locked(task));
    return task.work;
  }
  if (task.allreduce) task.call = task.allreduce->call(task.tag, task.data);
  std::shared_ptr<Work> work = task.work;
  // A caller that blocks on this collective runs it on its own thread when it is next in line:
  // no hand-off to the executor and back, which would cost a small message more than its
  // exchange. Its waits must all go through the context to be interruptible.
  const bool on_caller = caller && queue_.empty() && !running_ && !task.ready &&
                         (!task.call || task.allreduce->waits_through_context());
  if (!on_caller) {
    queue_.push_back(std::move(task));
    start_ahead_locked();
    queued_.notify_one();
    return work;
  }
  begin_locked(task);
  caller_thread_ = std::this_thread::get_id();
  std::shared_ptr<Transport> transport = transport_;  // close() may drop its own meanwhile
  lock.unlock();
  execute(task, *transport, caller);
  return work;
}

// An all-reduce call may start (send ahead of its turn) once no earlier unfinished collective
// reads or writes its buffer, and its input is ready; calls start in queue order.
void Communicator::start_ahead_locked() {
  if (!failure_.empty()) return;
  std::vector<MemoryRange> earlier = running_memory_;
  for (auto& task : queue_) {
    const bool clear = std::none_of(earlier.begin(), earlier.end(), [&](const MemoryRange& m) {
      return std::any_of(task.memory.begin(), task.memory.end(),
                         [&](const MemoryRange& mine) { return mine.overlaps(m); });
    });
    const bool ready = !task.ready || task.ready->is_open();
    if (task.call && task.call->waits_to_start() && !(clear && ready && task.call->start())) return;
    earlier.insert(earlier.end(), task.memory.begin(), task.memory.end());
  }
}

std::exception_ptr Communicator::aborted_earlier_locked(const Task& task) const {
  return std::make_exception_ptr(CollectiveError(task.tag.describe() + " on rank " + std::to_string(rank()) +
                                                 ": the communicator was aborted by an earlier failure (" + failure_ +
                                                 "); create a new one"));
}

void Communicator::begin_locked(Task& task) {
  running_ = true;
  running_memory_ = task.memory;
  // One whose input is not ready yet starts in execute(), once it is.
  if (task.call && task.call->waits_to_start() && (!task.ready || task.ready->is_open())) task.call->start();
}

void Communicator::execute_loop() {
  for (;;) {
    Task task;
    std::exception_ptr aborted_earlier;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // Not while a caller's thread runs a collective: they run one at a time, in order.
      queued_.wait(lock, [&] { return closing_ || (!queue_.empty() && !running_); });
      if (queue_.empty() || running_) return;
      task = std::move(queue_.front());
      queue_.pop_front();
      // Queued before the failure: it cannot run without the peers it lost.
      if (!failure_.empty()) {
        aborted_earlier = aborted_earlier_locked(task);
      } else {
        begin_locked(task);
      }
    }
    if (aborted_earlier) {
      // Outside the lock: its when_done callbacks may queue the next collective.
      task.work->finish(aborted_earlier);
      continue;
    }
    execute(task, *transport_, nullptr);
  }
}

void Communicator::execute(Task& task, Transport& transport, Interruption* caller) {
  AlgorithmContext ctx{transport, group_, task.tag, deadline_after(options_.timeout_seconds),
                       options_.segment_bytes, scratch_, options_.debug, caller};
  std::exception_ptr error;
  bool close_now = false;
  if (board_) board_->announce(task.tag);
  try {
    if (ctx.debug) ctx.log(task.call ? std::string("start (") + task.allreduce->name() + ")" : "start");
    if (task.ready) {
      task.ready->wait(ctx.deadline);
      std::lock_guard<std::mutex> lock(mutex_);
      if (task.call->waits_to_start()) task.call->start();
    }
    if (task.call) {
      task.call->run(ctx);
    } else {
      task.run(ctx);
    }
    ctx.log("done");
  } catch (const std::exception& e) {
    // The first failure aborts the communicator: the peers are told, and every collective
    // after this one fails at once instead of waiting on them. The transport lets go of
    // this collective's buffers before the caller hears of the failure.
    std::string message = task.tag.describe() + " failed on rank " + std::to_string(rank()) + ": " + e.what();
    ctx.log(std::string("failed: ") + e.what());
    transport.abort(e.what());
    transport.quiesce();
    // The reducers hear why, and tell the other workers (which may be waiting on them).
    if (reduction_server_) reduction_server_->close(e.what());
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
    if (task.call && !error) {
      task.call->succeeded();
      start_ahead_locked();
    }
    // The executor takes what was queued meanwhile; close() waits for the caller's run. Nobody
    // else waits for this: a wake-up per collective would cost a small one a context switch.
    if (!queue_.empty() || closing_) queued_.notify_all();
    if (caller) {
      caller_thread_ = {};
      close_now = std::exchange(close_when_done_, false);
    }
  }
  task.work->finish(error);
  if (close_now) close();
}

namespace {

MemoryRange bytes_of(const void* data, size_t count, DataType dtype) {
  const char* begin = static_cast<const char*>(data);
  return {begin, begin + count * element_size(dtype)};
}

}  // namespace

std::shared_ptr<Work> Communicator::allreduce(void* data, size_t count, DataType dtype, ReduceOp op,
                                              Interruption* caller, std::shared_ptr<InputGate> ready) {
  if (ready && caller) throw std::invalid_argument("an all-reduce waiting for its input is never run on the caller's thread");
  check_reducible(dtype, op);
  Task task;
  task.ready = std::move(ready);
  task.tag = {CollectiveKind::kAllreduce, 0, count, dtype, op};
  task.memory = {bytes_of(data, count, dtype)};
  task.allreduce = &choose_allreduce(count, dtype, /*with_board=*/true);
  task.data = data;
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::allgather(const void* input, void* output, size_t count, DataType dtype,
                                              Interruption* caller) {
  Task task;
  task.tag = {CollectiveKind::kAllgather, 0, count, dtype, ReduceOp::kSum};
  task.memory = {bytes_of(input, count, dtype), bytes_of(output, count * size(), dtype)};
  Hierarchy* plan = hierarchical_for(CollectiveKind::kAllgather, count * size(), dtype);
  task.run = [=](const AlgorithmContext& ctx) {
    plan ? allgather_hierarchical(ctx, *plan, input, output, count) : allgather_ring(ctx, input, output, count);
  };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::broadcast(void* data, size_t count, DataType dtype, int root,
                                              Interruption* caller) {
  if (root < 0 || root >= size()) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not a rank of a " +
                                std::to_string(size()) + "-rank communicator");
  }
  Task task;
  task.tag = {CollectiveKind::kBroadcast, 0, count, dtype, ReduceOp::kSum, static_cast<uint32_t>(root)};
  task.memory = {bytes_of(data, count, dtype)};
  const Hierarchy* plan = hierarchical_for(CollectiveKind::kBroadcast, count, dtype);
  task.run = [=](const AlgorithmContext& ctx) {
    plan ? broadcast_hierarchical(ctx, *plan, data, count, root) : broadcast_chain(ctx, data, count, root);
  };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::reduce_scatter(const void* input, void* output, size_t count,
                                                   DataType dtype, ReduceOp op, Interruption* caller) {
  check_reducible(dtype, op);
  Task task;
  task.tag = {CollectiveKind::kReduceScatter, 0, count, dtype, op};
  task.memory = {bytes_of(input, count * size(), dtype), bytes_of(output, count, dtype)};
  Hierarchy* plan = hierarchical_for(CollectiveKind::kReduceScatter, count * size(), dtype);
  task.run = [=](const AlgorithmContext& ctx) {
    plan ? reduce_scatter_hierarchical(ctx, *plan, input, output, count) : reduce_scatter_ring(ctx, input, output, count);
  };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::barrier(Interruption* caller) {
  Task task;
  task.tag = {CollectiveKind::kBarrier, 0, 0, DataType::kUInt8, ReduceOp::kSum};
  task.run = [](const AlgorithmContext& ctx) { barrier_dissemination(ctx); };
  return enqueue(std::move(task), caller);
}

void Communicator::check_root(int root) const {
  if (root < 0 || root >= size()) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not a rank of a " + std::to_string(size()) +
                                "-rank communicator");
  }
}

std::shared_ptr<Work> Communicator::reduce(void* data, size_t count, DataType dtype, ReduceOp op, int root,
                                           Interruption* caller) {
  check_root(root);
  check_reducible(dtype, op);
  Task task;
  task.tag = {CollectiveKind::kReduce, 0, count, dtype, op, static_cast<uint32_t>(root)};
  task.memory = {bytes_of(data, count, dtype)};
  task.run = [=](const AlgorithmContext& ctx) { reduce_to_root(ctx, data, count, root); };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::gather(const void* input, void* output, size_t count, DataType dtype, int root,
                                           Interruption* caller) {
  check_root(root);
  Task task;
  task.tag = {CollectiveKind::kGather, 0, count, dtype, ReduceOp::kSum, static_cast<uint32_t>(root)};
  task.memory = {bytes_of(input, count, dtype)};
  if (rank() == root) task.memory.push_back(bytes_of(output, count * size(), dtype));
  task.run = [=](const AlgorithmContext& ctx) { gather_linear(ctx, input, output, count, root); };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::scatter(const void* input, void* output, size_t count, DataType dtype, int root,
                                            Interruption* caller) {
  check_root(root);
  Task task;
  task.tag = {CollectiveKind::kScatter, 0, count, dtype, ReduceOp::kSum, static_cast<uint32_t>(root)};
  task.memory = {bytes_of(output, count, dtype)};
  if (rank() == root) task.memory.push_back(bytes_of(input, count * size(), dtype));
  task.run = [=](const AlgorithmContext& ctx) { scatter_linear(ctx, input, output, count, root); };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::alltoall(const void* input, std::vector<size_t> send_counts, void* output,
                                             std::vector<size_t> recv_counts, DataType dtype,
                                             Interruption* caller) {
  if (static_cast<int>(send_counts.size()) != size() || static_cast<int>(recv_counts.size()) != size()) {
    throw std::invalid_argument("alltoall needs one send count and one receive count per rank (" +
                                std::to_string(size()) + "), got " + std::to_string(send_counts.size()) + " and " +
                                std::to_string(recv_counts.size()));
  }
  if (send_counts[rank()] != recv_counts[rank()]) {
    throw std::invalid_argument("alltoall: rank " + std::to_string(rank()) + " sends itself " +
                                std::to_string(send_counts[rank()]) + " elements but expects to receive " +
                                std::to_string(recv_counts[rank()]));
  }
  size_t sent = 0, received = 0;
  for (int j = 0; j < size(); ++j) {
    sent += send_counts[j];
    received += recv_counts[j];
  }
  Task task;
  // The tag's count is the total sent; each pair's frames carry that pair's count instead.
  task.tag = {CollectiveKind::kAlltoall, 0, sent, dtype, ReduceOp::kSum};
  task.memory = {bytes_of(input, sent, dtype), bytes_of(output, received, dtype)};
  task.run = [=, send_counts = std::move(send_counts), recv_counts = std::move(recv_counts)](const AlgorithmContext& ctx) {
    alltoall_pairwise(ctx, input, send_counts, output, recv_counts);
  };
  return enqueue(std::move(task), caller);
}

std::shared_ptr<Work> Communicator::send(const void* data, size_t count, DataType dtype, int peer, uint32_t tag) {
  return message(true, const_cast<void*>(data), count, dtype, peer, tag);
}

std::shared_ptr<Work> Communicator::recv(void* data, size_t count, DataType dtype, int peer, uint32_t tag) {
  return message(false, data, count, dtype, peer, tag);
}

std::shared_ptr<Work> Communicator::recv_any(void* data, size_t count, DataType dtype, uint32_t tag) {
  if (size() < 2) throw std::invalid_argument("recv from any source: this communicator has no other rank");
  return message(false, data, count, dtype, kAnySource, tag);
}

std::shared_ptr<Work> Communicator::message(bool is_send, void* data, size_t count, DataType dtype, int peer,
                                            uint32_t tag) {
  const bool any_source = peer == kAnySource;
  if (!any_source && (peer < 0 || peer >= size() || peer == rank())) {
    throw std::invalid_argument(std::string(is_send ? "send to " : "recv from ") + "rank " + std::to_string(peer) +
                                ": not another rank of this " + std::to_string(size()) + "-rank communicator");
  }
  auto work = std::make_shared<Work>();
  CollectiveTag tag_of{CollectiveKind::kSendRecv, 0, count, dtype, ReduceOp::kSum, tag};
  // Each tag a lane of its own (FrameHeader::comm), derived alike by both ends from the
  // communicator's id and the tag (FNV-1a, as subgroup ids), so that messages of one tag do
  // not queue behind another's.
  tag_of.comm = fnv1a({id_, uint64_t{0x70327032}, uint64_t{tag}});
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_ || !transport_) throw CollectiveError("the communicator is closed");
    // A send is numbered among this rank's messages to that rank with that tag; a receive takes
    // its number from the transport as a message is matched with it (transport/matching.h).
    std::string what;
    if (is_send) {
      tag_of.seq = sent_[{group_.peer(peer), tag}]++;
      what = tag_of.describe() + " to rank " + std::to_string(peer);
    } else {
      what = "recv (tag " + std::to_string(tag) + ", " + std::to_string(count) + " x " + to_string(dtype) + ") from " +
             (any_source ? "any rank" : "rank " + std::to_string(peer));
    }
    if (!failure_.empty()) {
      work->finish(std::make_exception_ptr(CollectiveError(
          what + " on rank " + std::to_string(rank()) + ": the communicator was aborted by an earlier failure (" +
          failure_ + "); create a new one")));
      return work;
    }
    const FrameHeader header = tag_of.header(0, count * element_size(dtype));
    TransportRequest request;
    std::vector<int> sources;  // a receive from any source: the other members, in this communicator's order
    if (any_source) {
      sources = members();
      sources.erase(sources.begin() + rank());
      request = transport_->recv_any(sources, header, data);
    } else {
      const int global = group_.peer(peer);
      request = is_send ? transport_->send(global, header, data) : transport_->recv(global, header, data);
    }
    work->message_ = Work::Message{transport_, std::move(request), deadline_after(options_.timeout_seconds), what, rank(),
                                   members()};
    if (!is_send && !any_source) work->source_ = peer;
    // Those dropped, or seen done, are forgotten (asking the transport here would wait under the lock).
    messages_.erase(std::remove_if(messages_.begin(), messages_.end(),
                                   [](const std::weak_ptr<Work>& w) {
                                     auto held = w.lock();
                                     if (!held) return true;
                                     std::lock_guard<std::mutex> finished(held->mutex_);
                                     return held->done_;
                                   }),
                    messages_.end());
    messages_.push_back(work);
    if (options_.debug) std::fprintf(stderr, "[collectives rank %d] %s: posted\n", rank(), what.c_str());
  }
  return work;
}

std::vector<ReducerStat> Communicator::reducer_stats() const {
  return reduction_server_ ? reduction_server_->stats() : std::vector<ReducerStat>{};
}

void Communicator::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!transport_) return;  // closed already
  if (failure_.empty()) failure_ = reason;
  transport_->abort(reason);
  if (reduction_server_) reduction_server_->cancel(reason);
}

void Communicator::close() {
  const std::string during = "rank " + std::to_string(rank()) + " closed its communicator during a collective";
  std::deque<Task> abandoned;
  bool running;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (running_ && caller_thread_ == std::this_thread::get_id()) {
      // From inside the collective this thread runs (a signal handler): waiting for it to end
      // would wait on itself. It is ended, and the rest of closing done once it has unwound.
      close_when_done_ = true;
      std::shared_ptr<Transport> transport = transport_;
      lock.unlock();
      transport->abort(during);
      return;
    }
    if (closing_) return;
    closing_ = true;
    running = running_;
    abandoned.swap(queue_);
    queued_.notify_one();
  }
  // A collective or a message still in flight cannot finish without this rank: end it now,
  // and let the peers know why, rather than keep them waiting for their timeout.
  std::vector<std::weak_ptr<Work>> messages;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    messages.swap(messages_);
  }
  const bool message_pending = std::any_of(messages.begin(), messages.end(), [](const std::weak_ptr<Work>& w) {
    auto held = w.lock();
    return held && !held->done();
  });
  if (message_pending && !running) {
    transport_->abort("rank " + std::to_string(rank()) + " closed its communicator with a message unfinished");
  }
  if (running) {
    transport_->abort(during);
    if (reduction_server_) reduction_server_->cancel(during);
  }
  executor_.join();
  {
    // A caller's thread may be inside a collective still: it ends soon, the transport aborted.
    std::unique_lock<std::mutex> lock(mutex_);
    queued_.wait(lock, [&] { return !running_; });
  }
  if (board_) board_->leave();
  if (reduction_server_) {
    // Before the abandoned collectives fail: some may have been posted ahead, and their
    // buffers may be freed as soon as they fail. A goodbye tells the reducers that this
    // is no failure; otherwise they hear why, and tell the other workers.
    std::lock_guard<std::mutex> lock(mutex_);
    std::string failure = failure_;
    if (failure.empty() && (running || !abandoned.empty())) {
      failure = "rank " + std::to_string(rank()) + " closed its communicator with collectives unfinished";
    }
    reduction_server_->close(failure);
  }
  for (auto& task : abandoned) {
    task.work->finish(std::make_exception_ptr(
        CollectiveError(task.tag.describe() + ": the communicator was closed before it ran")));
  }
  std::shared_ptr<Transport> transport;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    transport.swap(transport_);
  }
  transport.reset();  // the last communicator over it says goodbye to the peers and closes the sockets
}

}  // namespace collectives
