// An all-reduce of a buffer that the host cannot reduce in place (a GPU's), staged through a few
// host slots (pinned, for CUDA) by a CopyEngine, piece by piece, so that the copy of piece k+1
// overlaps the all-reduce of piece k, and the copy back of piece k the all-reduce of piece k+1.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "communicator.h"
#include "staging/copy_engine.h"

namespace collectives {

class StagedAllreduce {
 public:
  // Pieces of piece_bytes (rounded up to a multiple of 8, the widest element), through `slots`
  // host slots of that size, allocated at the first call and kept until close().
  StagedAllreduce(std::unique_ptr<CopyEngine> engine, size_t piece_bytes, size_t slots);
  ~StagedAllreduce();
  StagedAllreduce(const StagedAllreduce&) = delete;
  StagedAllreduce& operator=(const StagedAllreduce&) = delete;

  // Queues the all-reduce of `count` elements at `buffer` (the engine's to copy) on `comm` and
  // returns at once; the Work is done once every piece is reduced and copied back, or failed
  // with the first piece's error (a piece whose all-reduce failed is not copied back). The
  // buffer must stay valid, and unwritten, until then. Every rank must call it where it would
  // call comm.allreduce: its pieces are that many all-reduces, queued now, in order.
  std::shared_ptr<Work> allreduce(Communicator& comm, void* buffer, size_t count, DataType dtype, ReduceOp op);
  // Waits for the calls in flight (close their communicator first, so that they end), stops the
  // engine and frees the slots. Idempotent; a later allreduce() raises CollectiveError.
  void close();

 private:
  struct Call {
    std::shared_ptr<Work> work;
    size_t unreleased;   // its pieces not yet released
    uint64_t failed_at;  // its first failed piece, or UINT64_MAX
    std::exception_ptr error;  // that piece's
  };
  struct Piece {
    std::shared_ptr<Call> call;
    char* buffer;  // its place in the caller's buffer
    size_t bytes;
    std::shared_ptr<InputGate> filled_gate;  // opens once the slot holds the piece
    bool filled = false, reduced = false;
    std::exception_ptr error;
  };

  char* slot_of(uint64_t number) const { return slots_[number % slot_count_]; }
  void fill_locked(uint64_t number);
  void on_filled(uint64_t number, std::exception_ptr error);
  void on_reduced(uint64_t number, std::exception_ptr error);
  // What follows once a piece is both filled and reduced: its copy back, or its release.
  void settle_locked(uint64_t number, std::vector<std::shared_ptr<Call>>& finished);
  void release_locked(uint64_t number, std::vector<std::shared_ptr<Call>>& finished);
  static void finish(const std::vector<std::shared_ptr<Call>>& finished);

  const std::unique_ptr<CopyEngine> engine_;
  const size_t piece_bytes_;
  const size_t slot_count_;
  // Held through allreduce(): a call's pieces are numbered and queued before the next call's, so
  // that the communicator runs them in their numbers' order (piece n waits for piece n - S).
  std::mutex calls_;

  std::mutex mutex_;  // guards what follows; never held while taking calls_
  std::vector<char*> slots_;  // empty until the first call
  std::condition_variable idle_;  // notified as pieces_ empties
  bool closed_ = false;
  uint64_t next_piece_ = 0;
  std::map<uint64_t, Piece> pieces_;  // the unreleased ones, by number (over all calls)
};

}  // namespace collectives
