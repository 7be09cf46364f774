#include "algorithms/allreduce_board.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "transport/shm/waiting.h"

namespace collectives {

void BoardAllreduce::barrier(const AlgorithmContext& ctx) {
  const uint32_t target = board_->arrive();
  const Clock::time_point spin_end = Clock::now() + kShmWaitSpin;
  while (!board_->reached(target)) {
    const Clock::time_point now = Clock::now();
    if (now < spin_end) {
      if (board_->oversubscribed()) sched_yield();
      continue;
    }
    if (const TransportFailure failure = ctx.transport.failure(); !failure.empty()) failure.raise();
    for (int member : board_->late()) {
      std::string reason;
      if (board_->left_before_arriving(member)) {
        reason = ctx.tag.describe() + ": " + peer_has_closed(ctx.peer_name(member));
      } else if (board_->runs_another_call(member, ctx.tag)) {
        reason = ctx.peer_name(member) + " runs another call than this rank's " + ctx.tag.describe() +
                 " at the same place in the order (another collective, count, dtype, op or root): ranks must "
                 "issue the same collectives, in the same order, with the same length, dtype and op";
      }
      if (reason.empty()) continue;
      ctx.transport.abort(reason);
      throw CollectiveError(reason);
    }
    ctx.stop_if_interrupted();
    if (now >= ctx.deadline) {
      std::string late;
      for (int member : board_->late()) late += (late.empty() ? "" : ", ") + ctx.peer_name(member);
      const std::string reason = ctx.tag.describe() + ": " + (late.empty() ? "a rank" : late) +
                                 " did not reach the shared-memory barrier before the deadline";
      ctx.transport.abort(reason, true);
      throw TimeoutError(reason);
    }
    Clock::time_point until = std::min(ctx.deadline, now + kInterruptionCheck);
    if (ctx.interruption) until = std::min(until, std::max(now, ctx.interruption->next_check()));
    board_->sleep(target, std::chrono::duration_cast<std::chrono::nanoseconds>(until - now).count() + 1);
  }
}

void BoardAllreduce::check_headers(const AlgorithmContext& ctx, int set, const FrameHeader& expected) {
  for (int member = 0; member < board_->members(); ++member) {
    if (const std::string why = mismatch(expected, board_->header(set, member).header); !why.empty()) {
      const std::string reason = ctx.peer_name(member) + " wrote " + why;
      ctx.transport.abort(reason);
      throw CollectiveError(reason);
    }
  }
}

void BoardAllreduce::run(const AlgorithmContext& ctx, void* data, size_t count) {
  if (state_.load() == kUnagreed) {
    uint32_t lacking = board_ ? 0 : 1;
    agree_max(ctx, &lacking, 1, kAgreementUnit);
    state_.store(lacking ? kRefused : kAgreed);
    if (lacking && ctx.rank() == 0) {
      ctx.note("not every rank has the host's shared board (a pairing failed): all-reduces go by messages");
    }
  }
  if (state_.load() == kRefused) return otherwise_(ctx, data, count);
  const int members = board_->members(), me = board_->me();
  if (count == 0) return;
  const DataType dtype = ctx.tag.dtype;
  const ReduceOp op = ctx.tag.op;
  const size_t element = element_size(dtype);
  const size_t per_slot = kBoardSlotBytes / element;
  char* const buffer = static_cast<char*>(data);
  uint32_t unit = 0;
  for (size_t first = 0; first < count; first += per_slot, ++unit) {
    const size_t n = std::min(per_slot, count - first);
    char* const out = buffer + first * element;
    const FrameHeader header = ctx.tag.header(unit, n * element);
    const int set = board_->next_set();
    board_->header(set, me).header = header;
    char* const slot = board_->payload(set, me);
    if (n * element <= kEveryRankReducesBytes) {
      std::memcpy(slot, out, n * element);
      barrier(ctx);
      check_headers(ctx, set, header);
      std::memcpy(out, board_->payload(set, 0), n * element);
      for (int member = 1; member < members; ++member) reduce_into(out, board_->payload(set, member), n, dtype, op);
      continue;
    }
    /*
     * Member m reduces elements [part(m), part(m + 1)) of every slot, in member order, into its
     * own slot of the other set, which the next barrier publishes; then every member copies
     * every part out. part(m) = n * m / members: the parts differ by one element at most. A
     * member's own part is read from its buffer, so it copies only the others' parts in.
     */
    auto part = [&](int member) { return n * member / members; };
    const size_t begin = part(me) * element, bytes = (part(me + 1) - part(me)) * element;
    std::memcpy(slot, out, begin);
    std::memcpy(slot + begin + bytes, out + begin + bytes, n * element - begin - bytes);
    barrier(ctx);
    check_headers(ctx, set, header);
    const int results = board_->next_set();
    char* const mine = board_->payload(results, me);
    auto contribution = [&](int member) { return member == me ? out + begin : board_->payload(set, member) + begin; };
    std::memcpy(mine, contribution(0), bytes);
    for (int member = 1; member < members; ++member) reduce_into(mine, contribution(member), bytes / element, dtype, op);
    barrier(ctx);
    for (int member = 0; member < members; ++member) {
      std::memcpy(out + part(member) * element, board_->payload(results, member),
                  (part(member + 1) - part(member)) * element);
    }
  }
  if (op == ReduceOp::kAvg) divide(data, count, dtype, members);
  if (ctx.debug) ctx.log("board: " + std::to_string(unit) + " slot(s) through the host's shared memory");
}

}  // namespace collectives
