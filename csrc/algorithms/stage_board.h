// What the stages of a pipelined collective (one thread each, hierarchy.cc) tell each other on
// one rank: how many pieces each stage has finished, each way, and the first failure. A stage
// that waits on another waits here, with the collective's deadline; a stage that fails records
// its error first, so that the error the caller sees is the one that came first, not a sibling's
// "aborted" after it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "algorithms/algorithm.h"

namespace collectives {

class StageBoard {
 public:
  // Thrown by await() in a stage once another stage failed: that one's error is the one to report.
  struct Abandoned {};

  explicit StageBoard(size_t stages) : up_(stages, 0), down_(stages, 0) {}

  void finished(bool up, size_t stage) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++(up ? up_ : down_)[stage];
    changed_.notify_all();
  }
  // The first failure wins; returns whether this was it.
  bool fail(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool first = !failure_;
    if (first) failure_ = error;
    changed_.notify_all();
    return first;
  }
  void stage_done() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stages_done_;
    changed_.notify_all();
  }
  std::exception_ptr failure() {
    std::lock_guard<std::mutex> lock(mutex_);
    return failure_;
  }

  // Blocks until `stage` has finished piece `piece` of the `up` way (or down), at most until
  // `deadline`; on a caller's thread, asking its `interruption` between waits.
  void await(bool up, size_t stage, size_t piece, Deadline deadline, Interruption* interruption) {
    await_until(deadline, interruption, [&] { return (up ? up_ : down_)[stage] > piece; },
                [&] { return std::string(up ? "up" : "down") + " the stage " + std::to_string(stage) +
                             " of piece " + std::to_string(piece); });
  }
  // Blocks until `stages` stages have said stage_done().
  void await_stages(size_t stages, Deadline deadline, Interruption* interruption) {
    await_until(deadline, interruption, [&] { return stages_done_ >= stages; }, [] { return std::string("the other stages"); });
  }

 private:
  // A stage that waits here waits on another that waits on the transport, with the same
  // deadline: that one names the rank that stopped. The grace lets it speak first.
  static constexpr auto kGrace = std::chrono::seconds(1);

  template <typename Ready, typename What>
  void await_until(Deadline deadline, Interruption* interruption, Ready ready, What what) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (failure_) throw Abandoned{};
      if (ready()) return;
      const auto now = Clock::now();
      if (now > deadline + kGrace) throw TimeoutError("timed out waiting for " + what() + " on this rank");
      if (interruption) {
        changed_.wait_until(lock, std::min(interruption->next_check(), deadline + kGrace));
        lock.unlock();
        const bool interrupted = interruption->interrupted();
        lock.lock();
        if (interrupted) throw Interrupted();
      } else {
        changed_.wait_until(lock, deadline + kGrace);
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<size_t> up_, down_;  // pieces finished by each stage, each way
  size_t stages_done_ = 0;
  std::exception_ptr failure_;
};

}  // namespace collectives
