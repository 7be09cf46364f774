#include "staging/staged_allreduce.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace collectives {

/*
 * The schedule. Pieces are numbered in call order over every call (n = 0, 1, ...), and piece n
 * is staged in slot n % S (S = slot_count_). Each goes through:
 *   fill    the copy of its part of the buffer into its slot, issued once the slot is free
 *           (piece n - S released); it opens the piece's gate once done;
 *   reduce  its all-reduce of the slot, queued on the communicator when the call is made (all
 *           of a call's pieces at once, in order: every rank queues the same collectives in the
 *           same order, whatever the copies do), and run at its turn once its gate is open;
 *   drain   once both filled and reduced, and both succeeded: the copy of the slot back into
 *           the buffer;
 *   release once drained (at once after a failure): the slot is free, and piece n + S fills.
 * The engine runs copies in issue order and the communicator runs all-reduces in queue order, so
 * while piece k is reduced, pieces k+1 .. k+S-1 fill and piece k-1 drains. A call is done once
 * its last piece is released, with the error of its first failed piece. Every piece is released
 * in the end: piece n waits only for pieces before it, and an all-reduce that fails fails every
 * one queued after it (the communicator aborts) without waiting for its gate.
 */
StagedAllreduce::StagedAllreduce(std::unique_ptr<CopyEngine> engine, size_t piece_bytes, size_t slots)
    : engine_(std::move(engine)), piece_bytes_((std::max<size_t>(piece_bytes, 1) + 7) / 8 * 8), slot_count_(slots) {
  if (slots == 0) throw std::invalid_argument("staging needs at least one slot");
}

StagedAllreduce::~StagedAllreduce() { close(); }

void StagedAllreduce::close() {
  std::lock_guard<std::mutex> no_call(calls_);
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = true;
    idle_.wait(lock, [&] { return pieces_.empty(); });
  }
  engine_->stop();  // its last done() may still be returning
  for (char* slot : slots_) engine_->free_host(slot);
  slots_.clear();
}

std::shared_ptr<Work> StagedAllreduce::allreduce(Communicator& comm, void* buffer, size_t count, DataType dtype,
                                                 ReduceOp op) {
  check_reducible(dtype, op);  // refused before any piece is queued, as a plain all-reduce is
  std::lock_guard<std::mutex> one_call_at_a_time(calls_);
  const size_t element = element_size(dtype);
  const size_t per_piece = piece_bytes_ / element;  // elements
  const size_t pieces = count == 0 ? 1 : (count + per_piece - 1) / per_piece;
  auto call = std::make_shared<Call>(Call{std::make_shared<Work>(), pieces, UINT64_MAX, nullptr});
  uint64_t first;
  std::vector<std::pair<std::shared_ptr<InputGate>, size_t>> gates;  // each piece's, and its elements
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw CollectiveError("the communicator is closed");
    engine_->follow_caller();
    while (slots_.size() < slot_count_) slots_.push_back(static_cast<char*>(engine_->allocate_host(piece_bytes_)));
    first = next_piece_;
    next_piece_ += pieces;
    for (size_t i = 0; i < pieces; ++i) {
      const size_t begin = std::min(count, i * per_piece), end = std::min(count, begin + per_piece);
      Piece& piece = pieces_[first + i];
      piece.call = call;
      piece.buffer = static_cast<char*>(buffer) + begin * element;
      piece.bytes = (end - begin) * element;
      piece.filled_gate = std::make_shared<InputGate>();
      gates.emplace_back(piece.filled_gate, end - begin);
      if (first + i < slot_count_ || pieces_.count(first + i - slot_count_) == 0) fill_locked(first + i);
    }
  }
  // Queued without the lock: an all-reduce on a failed communicator is done at once, and its
  // callback takes the lock.
  for (size_t i = 0; i < pieces; ++i) {
    const uint64_t number = first + i;
    std::shared_ptr<Work> work;
    try {
      work = comm.allreduce(slot_of(number), gates[i].second, dtype, op, nullptr, gates[i].first);
    } catch (...) {  // the communicator was closed: this piece and the rest never run
      for (size_t j = i; j < pieces; ++j) on_reduced(first + j, std::current_exception());
      break;
    }
    work->when_done([this, number](std::exception_ptr error) { on_reduced(number, error); });
  }
  return call->work;
}

void StagedAllreduce::fill_locked(uint64_t number) {
  const Piece& piece = pieces_.at(number);
  engine_->copy(slot_of(number), piece.buffer, piece.bytes,
                [this, number](std::exception_ptr error) { on_filled(number, error); });
}

void StagedAllreduce::on_filled(uint64_t number, std::exception_ptr error) {
  std::vector<std::shared_ptr<Call>> finished;
  std::shared_ptr<InputGate> gate;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Piece& piece = pieces_.at(number);
    piece.filled = true;
    if (!piece.error) piece.error = error;
    gate = piece.filled_gate;
    if (piece.reduced) settle_locked(number, finished);
  }
  gate->open(error);
  finish(finished);
}

void StagedAllreduce::on_reduced(uint64_t number, std::exception_ptr error) {
  std::vector<std::shared_ptr<Call>> finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Piece& piece = pieces_.at(number);
    piece.reduced = true;
    // The all-reduce's error says more than the copy's it carries (it names the collective).
    if (error) piece.error = error;
    if (piece.filled) settle_locked(number, finished);
  }
  finish(finished);
}

void StagedAllreduce::settle_locked(uint64_t number, std::vector<std::shared_ptr<Call>>& finished) {
  Piece& piece = pieces_.at(number);
  if (piece.error) return release_locked(number, finished);  // nothing of a failed piece goes back
  engine_->copy(piece.buffer, slot_of(number), piece.bytes, [this, number](std::exception_ptr error) {
    std::vector<std::shared_ptr<Call>> finished;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Piece& piece = pieces_.at(number);
      if (error) piece.error = error;
      release_locked(number, finished);
    }
    finish(finished);
  });
}

void StagedAllreduce::release_locked(uint64_t number, std::vector<std::shared_ptr<Call>>& finished) {
  auto it = pieces_.find(number);
  Call& call = *it->second.call;
  if (it->second.error && number < call.failed_at) {
    call.failed_at = number;
    call.error = it->second.error;
  }
  if (--call.unreleased == 0) finished.push_back(it->second.call);
  pieces_.erase(it);
  if (pieces_.count(number + slot_count_)) fill_locked(number + slot_count_);
  if (pieces_.empty()) idle_.notify_all();
}

void StagedAllreduce::finish(const std::vector<std::shared_ptr<Call>>& finished) {
  for (const auto& call : finished) call->work->finish(call->error);
}

}  // namespace collectives
