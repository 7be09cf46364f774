#include "transport/shm/board.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <ctime>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/fnv.h"
#include "transport/shm/waiting.h"

namespace collectives {
namespace {

constexpr size_t kControlBytes = (sizeof(BoardControl) + 63) / 64 * 64;

// The futex calls on a word that several processes map: not FUTEX_PRIVATE_FLAG.
long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

}  // namespace

size_t board_bytes(int members) { return kControlBytes + 2 * static_cast<size_t>(members) * kBoardSlotStride; }

int create_shm_board(int members) {
  if (members < 2 || members > kBoardMaxMembers) {
    throw std::invalid_argument("a shared board is for 2 to " + std::to_string(kBoardMaxMembers) + " ranks, not " +
                                std::to_string(members));
  }
  return create_sealed_memfd("collectives-board", board_bytes(members));
}

ShmBoard::ShmBoard(FileDescriptor fd, std::vector<int> members, int me)
    : members_(std::move(members)), me_(me), oversubscribed_(ranks_outnumber_cores(static_cast<int>(members_.size()))) {
  const int count = static_cast<int>(members_.size());
  if (count < 2 || count > kBoardMaxMembers || me < 0 || me >= count) {
    throw std::invalid_argument("a shared board needs 2 to " + std::to_string(kBoardMaxMembers) +
                                " members and this rank among them");
  }
  mapping_ = SealedMapping(fd.get(), board_bytes(count));  // the mapping keeps the memory
  control_ = static_cast<BoardControl*>(mapping_.get());
  base_ = static_cast<char*>(mapping_.get()) + kControlBytes;
}

uint32_t ShmBoard::arrive() {
  ++barriers_;
  control_->passed[me_].store(barriers_, std::memory_order_relaxed);
  // Release: what this member wrote is visible to whoever sees the count; seq_cst against the
  // sleepers' announcement, so that a sleeper is either counted here or sees the new count.
  const uint32_t target = barriers_ * static_cast<uint32_t>(members_.size());
  const uint32_t now = control_->arrived.fetch_add(1, std::memory_order_seq_cst) + 1;
  if (now == target && control_->sleepers.load(std::memory_order_seq_cst) > 0) {
    futex(&control_->arrived, FUTEX_WAKE, INT_MAX, nullptr);
  }
  return target;
}

void ShmBoard::sleep(uint32_t target, int64_t timeout_ns) {
  control_->sleepers.fetch_add(1, std::memory_order_seq_cst);
  const uint32_t seen = control_->arrived.load(std::memory_order_seq_cst);
  if (static_cast<int32_t>(seen - target) < 0) {
    const timespec timeout{static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)};
    futex(&control_->arrived, FUTEX_WAIT, seen, &timeout);  // returns at once if it moved meanwhile
  }
  control_->sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void ShmBoard::leave() {
  control_->left[me_].store(1, std::memory_order_seq_cst);
  // A sleeper's futex word is `arrived`: bump nothing, wake them all to look again.
  if (control_->sleepers.load(std::memory_order_seq_cst) > 0) futex(&control_->arrived, FUTEX_WAKE, INT_MAX, nullptr);
}

bool ShmBoard::left_before_arriving(int member) const {
  // `left` first: a member raises it after its last arrival, so once it shows, `passed` is final.
  if (!control_->left[member].load(std::memory_order_acquire)) return false;
  return static_cast<int32_t>(control_->passed[member].load(std::memory_order_relaxed) - barriers_) < 0;
}

namespace {

// The call's place in the order (low 32 bits) and a hash of what the ranks must agree on (the
// high 32 bits of its FNV-1a).
uint64_t call_signature(const CollectiveTag& tag) {
  const uint64_t hash = fnv1a({static_cast<uint64_t>(tag.kind), tag.count, static_cast<uint64_t>(tag.dtype),
                               static_cast<uint64_t>(tag.op), static_cast<uint64_t>(tag.root), tag.comm});
  return (hash & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(tag.seq);
}

}  // namespace

void ShmBoard::announce(const CollectiveTag& tag) {
  control_->calls[me_].store(call_signature(tag), std::memory_order_release);
}

bool ShmBoard::runs_another_call(int member, const CollectiveTag& tag) const {
  const uint64_t theirs = control_->calls[member].load(std::memory_order_acquire), mine = call_signature(tag);
  return static_cast<uint32_t>(theirs) == static_cast<uint32_t>(mine) && theirs != mine;
}

std::vector<int> ShmBoard::late() const {
  std::vector<int> late;
  for (int m = 0; m < members(); ++m) {
    if (static_cast<int32_t>(control_->passed[m].load(std::memory_order_relaxed) - barriers_) < 0) late.push_back(m);
  }
  return late;
}

}  // namespace collectives
