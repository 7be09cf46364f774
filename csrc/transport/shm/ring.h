// A single-producer, single-consumer byte ring in memory two processes share: the producer
// rank writes frames (header, then payload) as a byte stream, the consumer rank reads them.
// Beside the stream, the control block carries what must get through even when the ring is
// full: the producer's abort and its reason, its goodbye, a stall question and its answer,
// and the flags by which a side that went to sleep asks to be woken.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "transport/frame.h"

namespace collectives {

// Shared between processes: only lock-free atomics, which work across address spaces.
// head and tail sit on cache lines of their own, since each is written by one side and
// polled by the other.
struct RingControl {
  alignas(64) std::atomic<uint64_t> head;  // producer: bytes ever written
  alignas(64) std::atomic<uint64_t> tail;  // consumer: bytes ever read
  alignas(64) std::atomic<uint32_t> reader_asleep;  // consumer: ring my doorbell when head moves
  std::atomic<uint32_t> writer_asleep;              // producer: ring my doorbell when tail moves
  std::atomic<uint32_t> closed;   // producer: goodbye; nothing follows what is in the ring
  std::atomic<uint32_t> aborted;  // producer: 0, or kAborted/kTimedOut (reason below is set)
  std::atomic<uint64_t> question;  // producer: a counter, bumped to ask what the consumer waits on
  std::atomic<uint64_t> answered;  // consumer: the question its answer is for
  std::atomic<int64_t> answer;     // consumer: the rank it waits to receive from, or -1
  // Messages copied straight from the producer's memory (FrameKind::kByReference): where the
  // producer keeps kDirectProbe, for the consumer to try reading it so (process_vm_readv), the
  // consumer's verdict (kUntried, kReadsDirectly, kCannot), and how many such messages it has
  // copied, in order (the producer's buffers are its own again).
  std::atomic<uint64_t> probe_address;  // producer
  std::atomic<uint32_t> reads_directly;  // consumer
  std::atomic<uint64_t> taken_directly;  // consumer
  uint32_t reason_bytes;           // producer, before `aborted` is set
  char reason[kMaxAbortReason];
  static constexpr uint32_t kAborted = 1, kTimedOut = 2;
  static constexpr uint32_t kUntried = 0, kReadsDirectly = 1, kCannot = 2;
  static constexpr uint64_t kDirectProbe = 0x434c4354444952ull;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared rings need lock-free atomics");

/*
 * One side's view of a ring of `capacity` bytes (a power of two) at `data`.
 *
 * head and tail count bytes since the ring was made and never wrap (2^64 bytes would take
 * decades): head - tail is the number of bytes written and not yet read, so the ring is empty
 * when they are equal and full when head - tail == capacity, with no slot left unused to tell
 * the two apart. A byte count becomes a place in `data` by masking, count & (capacity - 1);
 * a piece that runs past the end of `data` continues at its start, so it is copied in two
 * parts (copy_in, copy_out).
 *
 * Ordering: the producer copies bytes in, then publishes them with a release store of head;
 * the consumer's acquire load of head makes them visible before it copies them out, and its
 * release store of tail hands the space back to the producer's acquire load of tail.
 */
class RingView {
 public:
  RingView() = default;
  RingView(RingControl* control, char* data, uint64_t capacity)
      : control_(control), data_(data), capacity_(capacity) {}

  RingControl& control() const { return *control_; }

  // Consumer: bytes readable now. More than `capacity` means the peer broke the ring.
  uint64_t readable() const {
    return control_->head.load(std::memory_order_acquire) - control_->tail.load(std::memory_order_relaxed);
  }
  // Consumer: copies `n` readable bytes that start `skip` bytes past the tail, leaving them.
  void peek(uint64_t skip, void* into, size_t n) const;
  // Consumer: gives the first `n` readable bytes back to the producer.
  void consume(uint64_t n) {
    control_->tail.store(control_->tail.load(std::memory_order_relaxed) + n, std::memory_order_release);
  }

  // Producer: bytes that fit now.
  uint64_t writable() const {
    return capacity_ - (control_->head.load(std::memory_order_relaxed) -
                        control_->tail.load(std::memory_order_acquire));
  }
  // Producer: copies `n` bytes (n <= writable()) in, not yet visible to the consumer.
  void put(uint64_t skip, const void* from, size_t n);
  // Producer: makes the first `n` bytes put since the last publish visible.
  void publish(uint64_t n) {
    control_->head.store(control_->head.load(std::memory_order_relaxed) + n, std::memory_order_release);
  }

 private:
  RingControl* control_ = nullptr;
  char* data_ = nullptr;
  uint64_t capacity_ = 0;
};

}  // namespace collectives
