#include "transport/matching.h"

#include <cstring>
#include <new>

#include "transport/transport.h"

namespace collectives {
namespace {

bool may_complete(const PostedOperation& op, int peer) {
  return std::find(op.sources.begin(), op.sources.end(), peer) != op.sources.end();
}

}  // namespace

bool ReceiveMatching::all_gone_locked(const PostedOperation& op) const {
  return std::all_of(op.sources.begin(), op.sources.end(),
                     [&](int p) { return std::find(gone_.begin(), gone_.end(), p) != gone_.end(); });
}

bool ReceiveMatching::post(const PostedOperationPtr& op, bool* all_gone) {
  std::lock_guard<std::mutex> lock(mutex_);
  op->order = next_order();
  *all_gone = all_gone_locked(*op);
  if (failed_ || *all_gone) {
    op->done = true;
    return false;
  }
  pending_.push_back(op);
  pending_count_.store(pending_.size());
  return true;
}

PostedOperationPtr ReceiveMatching::take(int peer, uint64_t comm, std::deque<PostedOperationPtr>& mine) {
  const bool numbered = !mine.empty() && mine.front()->header.collective == static_cast<uint8_t>(CollectiveKind::kSendRecv);
  if (pending_count_.load() == 0 && !numbered) {
    if (mine.empty()) return nullptr;
    PostedOperationPtr op = mine.front();
    mine.pop_front();
    return op;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto any = std::find_if(pending_.begin(), pending_.end(), [&](const PostedOperationPtr& op) {
    return uint64_t{op->header.comm} == comm && may_complete(*op, peer);
  });
  PostedOperationPtr op;
  if (any != pending_.end() && (mine.empty() || (*any)->order < mine.front()->order)) {
    op = *any;
    pending_.erase(any);
    pending_count_.store(pending_.size());
    op->peer = peer;
  } else if (!mine.empty()) {
    op = mine.front();
    mine.pop_front();
  } else {
    return nullptr;
  }
  number_locked(peer, op->header);
  return op;
}

bool ReceiveMatching::claim(PostedOperation& op, int peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = std::find_if(pending_.begin(), pending_.end(), [&](const PostedOperationPtr& p) { return p.get() == &op; });
  if (it == pending_.end()) return false;
  pending_.erase(it);
  pending_count_.store(pending_.size());
  op.peer = peer;
  number_locked(peer, op.header);
  return true;
}

void ReceiveMatching::number(int peer, FrameHeader& expected) {
  if (expected.collective != static_cast<uint8_t>(CollectiveKind::kSendRecv)) return;
  std::lock_guard<std::mutex> lock(mutex_);
  number_locked(peer, expected);
}

void ReceiveMatching::number_locked(int peer, FrameHeader& expected) {
  if (expected.collective != static_cast<uint8_t>(CollectiveKind::kSendRecv)) return;
  expected.seq = numbers_[{peer, uint64_t{expected.comm}}]++;
}

bool ReceiveMatching::awaits(int peer) {
  if (pending_count_.load() == 0) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  return std::any_of(pending_.begin(), pending_.end(), [&](const PostedOperationPtr& op) { return may_complete(*op, peer); });
}

int ReceiveMatching::awaited_rank() {
  std::lock_guard<std::mutex> lock(mutex_);
  return pending_.empty() ? -1 : pending_.front()->sources.front();
}

void ReceiveMatching::finish(PostedOperation& op, bool ok) {
  if (!op.from_any_source()) {
    op.done = true;
    op.ok = ok;
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  op.done = true;
  op.ok = ok;
  changed_.notify_all();
}

void ReceiveMatching::fail() {
  std::lock_guard<std::mutex> lock(mutex_);
  failed_ = true;
  for (const PostedOperationPtr& op : pending_) op->done = true;
  pending_.clear();
  pending_count_.store(0);
  changed_.notify_all();
}

std::vector<int> ReceiveMatching::gone(int peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  gone_.push_back(peer);
  for (const PostedOperationPtr& op : pending_) {
    if (all_gone_locked(*op)) return op->sources;
  }
  return {};
}

std::vector<char> read_ahead_buffer(const std::string& who, const FrameHeader& h, std::string* refused) {
  const std::string what = who + " sent a frame of " + std::to_string(h.nbytes) +
                           " bytes for a collective this rank has not reached, more than ";
  if (h.nbytes > kMaxReadAheadBytes) {
    *refused = what + "the " + std::to_string(kMaxReadAheadBytes >> 20) + " MiB it holds for one";
    return {};
  }
  try {
    return std::vector<char>(h.nbytes);
  } catch (const std::bad_alloc&) {
    *refused = what + "it can hold";
    return {};
  }
}

std::string take_stashed(std::deque<StashedFrame>& stash, PostedOperation& op) {
  const StashedFrame frame = std::move(stash.front());
  stash.pop_front();
  std::string why = mismatch(op.header, frame.header);
  if (why.empty() && frame.header.nbytes > 0) std::memcpy(op.data, frame.payload.data(), frame.header.nbytes);
  return why;
}

}  // namespace collectives
