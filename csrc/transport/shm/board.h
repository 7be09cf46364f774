// Memory that every rank of one host shares (beside the pairs' rings, shm/segment.h), for
// collectives that put each rank's contribution where all the others read it: one step instead
// of a message per peer. Each member owns a slot in each of two sets; a barrier (a counter that
// all members bump) says when every slot of a set is written. A sealed memfd like a pair's
// segment, made by the host's lowest rank and handed to the others over the pairing's Unix
// socket (collectives/_shm.py): only the job's processes map it, and nothing outlives them.
//
// Which set a write goes to: barrier e publishes set e % 2, and a member writes its slot of set
// e % 2 just before it arrives at barrier e. Every member reads what barrier e published before
// it arrives at barrier e + 1; a member writes set e % 2 again only before barrier e + 2, after
// it has passed barrier e + 1, so after every member has arrived there, done reading. So two
// sets are enough, whatever the algorithm does between barriers, as long as it reads only what
// the last barrier published.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/file_descriptor.h"
#include "transport/frame.h"
#include "transport/shm/segment.h"

namespace collectives {

constexpr int kBoardMaxMembers = 256;
constexpr size_t kBoardSlotBytes = size_t{1} << 20;  // payload bytes of a slot

// Shared between processes: only lock-free atomics.
struct BoardControl {
  alignas(64) std::atomic<uint32_t> arrived;   // arrivals at barriers, every member's together
  alignas(64) std::atomic<uint32_t> sleepers;  // members blocked in a futex wait on `arrived`
  alignas(64) std::atomic<uint32_t> passed[kBoardMaxMembers];  // barriers each member arrived at: who is late
  alignas(64) std::atomic<uint32_t> left[kBoardMaxMembers];  // 1 once a member closed its communicator
  // The collective each member runs now, whatever its algorithm: its sequence number (low 32
  // bits) and a hash of the call (high 32), so that members waiting at a barrier for a member
  // that runs another call at the same place in the order fail at once, not at their deadline.
  alignas(64) std::atomic<uint64_t> calls[kBoardMaxMembers];
};
static_assert(std::atomic<uint32_t>::is_always_lock_free, "a shared board needs lock-free atomics");

// A slot: the header of the call that wrote it (checked by every reader before it reads the
// payload), then the payload.
struct alignas(64) BoardSlotHeader {
  FrameHeader header;
};
constexpr size_t kBoardSlotStride = sizeof(BoardSlotHeader) + kBoardSlotBytes;

// The memfd's size for `members` members.
size_t board_bytes(int members);
// A new, sealed board for `members` members (1 < members <= kBoardMaxMembers).
int create_shm_board(int members);

class ShmBoard {
 public:
  // fd: the board (closed once mapped); members: the global ranks that share it, in member
  // order; me: this process's index among them.
  ShmBoard(FileDescriptor fd, std::vector<int> members, int me);

  int members() const { return static_cast<int>(members_.size()); }
  int me() const { return me_; }
  const std::vector<int>& ranks() const { return members_; }  // global, in member order
  // More members than cores: a spinning waiter yields its core.
  bool oversubscribed() const { return oversubscribed_; }

  // The set that the next barrier publishes (see the top of the file).
  int next_set() const { return static_cast<int>(barriers_ & 1); }
  BoardSlotHeader& header(int set, int member) const { return *reinterpret_cast<BoardSlotHeader*>(slot_at(set, member)); }
  char* payload(int set, int member) const { return slot_at(set, member) + sizeof(BoardSlotHeader); }

  // Arrives at the next barrier (what this member wrote is published); returns its target,
  // the value `arrived` has once every member has arrived.
  uint32_t arrive();
  bool reached(uint32_t target) const {
    return static_cast<int32_t>(control_->arrived.load(std::memory_order_acquire) - target) >= 0;
  }
  // Blocks until `arrived` moves or `timeout_ns` pass (a futex wait across the processes).
  void sleep(uint32_t target, int64_t timeout_ns);
  // Members (indices) that have not arrived at the barrier this member last arrived at.
  std::vector<int> late() const;
  // This member will arrive at no more barriers (its communicator closed): wakes the members
  // that wait, so that those waiting for it fail at once rather than at their deadline.
  void leave();
  // Whether `member` left without arriving at the barrier this member last arrived at.
  bool left_before_arriving(int member) const;
  // Says which collective this member runs now (every collective of the board's communicator,
  // whatever its algorithm).
  void announce(const CollectiveTag& tag);
  // Whether `member` has announced `tag`'s place in the order with another call.
  bool runs_another_call(int member, const CollectiveTag& tag) const;

 private:
  char* slot_at(int set, int member) const {
    return base_ + (static_cast<size_t>(set) * members_.size() + member) * kBoardSlotStride;
  }

  SealedMapping mapping_;
  BoardControl* control_;
  char* base_;  // the first slot of set 0
  const std::vector<int> members_;
  const int me_;
  const bool oversubscribed_;
  uint32_t barriers_ = 0;  // barriers this member has arrived at
};

}  // namespace collectives
