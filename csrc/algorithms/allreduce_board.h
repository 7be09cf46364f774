// All-reduce through the board that every rank of one host maps (transport/shm/board.h): each
// rank writes its buffer into its slot once, and after one barrier every rank reads every
// slot. No message goes from rank to rank, so a small all-reduce costs one write, one barrier
// and N reads, where recursive doubling waits on log2(N) messages in a row, each a hand-off
// between processes. Larger buffers take a second barrier so that the N reads are shared out:
// each rank reduces one part of every slot into its slot of the other set, and after the
// barrier every rank copies every part. A buffer larger than a slot goes a slot at a time.
//
// Every rank combines the slots in member order, (((s0 op s1) op s2) ...), so every rank ends
// with the same bits, however it splits the work. The calls' headers sit in the slots, and
// every rank checks all of them before it reads a payload byte, so ranks that called
// differently all fail at the same barrier. A rank that runs another call at that place in the
// order (another collective, or a count that the board does not take) never comes to the
// barrier: every collective of the communicator announces itself on the board
// (ShmBoard::announce), and the ranks that wait for it find the difference there.
//
// A rank whose pairing with the board's maker failed has no board; so the first call agrees
// (a max over the ranks, as a barrier) whether every rank has it, and from then on every rank
// uses the board, or every rank runs `otherwise` (the algorithm auto takes without a board).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

#include "algorithms/allreduce.h"
#include "transport/shm/board.h"

namespace collectives {

// All-reduces that auto sends through the board: all of them. Against the shared-memory ring,
// which copies each byte once (process_vm_readv), the board measured 1.6x at 1 MiB, even at
// 16 MiB and 1.3x at 64 MiB (4 ranks, benchmarks/RESULTS.md).
constexpr size_t kBoardDefaultUpToBytes = SIZE_MAX;

class BoardAllreduce : public DirectAllreduce {
 public:
  using Otherwise = std::function<void(const AlgorithmContext& ctx, void* data, size_t count)>;
  // board: this rank's, or null where it has none.
  BoardAllreduce(ShmBoard* board, Otherwise otherwise) : board_(board), otherwise_(std::move(otherwise)) {}
  const char* name() const override { return "board"; }
  void run(const AlgorithmContext& ctx, void* data, size_t count) override;
  // False once the ranks have found that one of them has no board.
  bool may_serve() const { return state_.load() != kRefused; }

  // Up to this many bytes per slot, every rank reduces every slot itself; above it, the two
  // barriers' scheme.
  static constexpr size_t kEveryRankReducesBytes = 64 << 10;

 private:
  // Arrives at the board's next barrier and waits for every member, as a transport's wait: until
  // the deadline (then it names the ranks that did not arrive, and aborts the transport), the
  // transport's failure, or the caller's interruption.
  void barrier(const AlgorithmContext& ctx);
  // Every member's header in `set` is `expected`, or the transport fails naming the first that is not.
  void check_headers(const AlgorithmContext& ctx, int set, const FrameHeader& expected);

  ShmBoard* const board_;
  const Otherwise otherwise_;
  enum State { kUnagreed, kAgreed, kRefused };
  std::atomic<int> state_{kUnagreed};  // set by run(), read when calls are queued
};

}  // namespace collectives
