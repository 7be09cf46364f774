// The staged all-reduce's schedule (staging/staged_allreduce.h) over real loopback TCP, ranks as
// threads, through the host-memory copy engine: the very schedule that CUDA's engine runs on a
// GPU (that engine is not run here: tests/gpu/check_cuda.py runs it where there is a GPU).
// Results against a plain all-reduce, bit for bit, with the ring and the reduction server,
// several calls in flight; what overlaps (piece k's all-reduce finishes while piece k+1's copy
// is held); the call returns before its copies are done; failures (an all-reduce, a copy) fail
// the call's Work and copy back nothing of a failed piece.
#include <condition_variable>
#include <cstring>
#include <mutex>

#include "harness.h"
#include "staging/host_copy_engine.h"
#include "staging/ordered_worker.h"
#include "staging/staged_allreduce.h"

using namespace collectives;
using namespace collectives::testing;

namespace {

constexpr size_t kPieceBytes = 4096, kSlots = 3;

std::vector<float> integers(int rank, size_t count, unsigned seed) { return rank_data<float>(rank, count, seed); }

std::vector<float> summed(const std::vector<std::vector<float>>& data) {
  std::vector<float> sum(data[0].size(), 0.0f);
  for (const auto& v : data) {
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += v[i];
  }
  return sum;
}

std::string message_of(const std::string& error) { return error.empty() ? "none" : error; }

// A copy engine over host memory that logs each copy when it is issued (a fill when its source
// is in `buffer`, else a drain), and can hold the copies from one on until release(), or fail
// one. Its copies run in order on its own thread, as the engines' contract says.
class ObservedEngine : public CopyEngine {
 public:
  struct Copy {
    bool fill;
    size_t offset;  // in the buffer
  };
  ObservedEngine(const char* buffer, size_t bytes) : buffer_(buffer), bytes_(bytes) {}
  void hold_from(size_t copy_number) { hold_from_ = copy_number; }
  void fail(size_t copy_number) { fail_ = copy_number; }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    released_ = true;
    changed_.notify_all();
  }
  // Waits until a copy matching `wanted` was issued; false after 10 s.
  bool wait_for_issue(const std::function<bool(const Copy&)>& wanted) {
    std::unique_lock<std::mutex> lock(mutex_);
    return changed_.wait_for(lock, std::chrono::seconds(10), [&] {
      return std::any_of(issued_.begin(), issued_.end(), wanted);
    });
  }
  std::vector<Copy> issued() {
    std::lock_guard<std::mutex> lock(mutex_);
    return issued_;
  }
  size_t completed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return completed_;
  }

  void* allocate_host(size_t bytes) override { return host_.allocate_host(bytes); }
  void free_host(void* host) noexcept override { host_.free_host(host); }
  void copy(void* dst, const void* src, size_t bytes, Done done) override {
    const char* s = static_cast<const char*>(src);
    const bool fill = s >= buffer_ && s < buffer_ + bytes_;
    size_t number;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      number = issued_.size();
      issued_.push_back({fill, static_cast<size_t>((fill ? s : static_cast<char*>(dst)) - buffer_)});
      changed_.notify_all();
    }
    worker_.post([=, done = std::move(done)] {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return released_ || number < hold_from_; });
        ++completed_;
      }
      if (number == fail_) return done(std::make_exception_ptr(CollectiveError("injected copy failure")));
      std::memcpy(dst, src, bytes);
      done(nullptr);
    });
  }
  void stop() override { worker_.stop(); }

 private:
  const char* buffer_;
  const size_t bytes_;
  HostCopyEngine host_;  // for its allocations
  size_t hold_from_ = SIZE_MAX, fail_ = SIZE_MAX;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool released_ = false;
  std::vector<Copy> issued_;
  size_t completed_ = 0;
  OrderedWorker worker_;  // last: its jobs use the fields above
};

// Several staged calls in flight (and plain all-reduces between them), each reduced exactly as
// a plain all-reduce of the same data.
void test_results(Job& job, const std::string& what) {
  const int size = static_cast<int>(job.comms.size());
  // Counts: nothing, one element, less than a piece, a ragged end, more pieces than slots.
  const std::vector<size_t> counts = {0, 1, 1000, 1025, 5 * 1024 + 3, 20000};
  std::vector<std::vector<std::vector<float>>> data(counts.size(), std::vector<std::vector<float>>(size));
  std::vector<std::vector<std::vector<float>>> plain(counts.size(), std::vector<std::vector<float>>(size));
  for (size_t c = 0; c < counts.size(); ++c) {
    for (int r = 0; r < size; ++r) data[c][r] = plain[c][r] = integers(r, counts[c], static_cast<unsigned>(c));
  }
  auto errors = job.run([&](int r) {
    StagedAllreduce staging(std::make_unique<HostCopyEngine>(), kPieceBytes, kSlots);
    std::vector<std::shared_ptr<Work>> works;
    for (size_t c = 0; c < counts.size(); ++c) {
      works.push_back(staging.allreduce(*job.comms[r], data[c][r].data(), counts[c], DataType::kFloat32, ReduceOp::kSum));
      works.push_back(job.comms[r]->allreduce(plain[c][r].data(), counts[c], DataType::kFloat32, ReduceOp::kSum));
    }
    for (auto& work : works) wait(work);
    staging.close();
  });
  for (int r = 0; r < size; ++r) {
    check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
    for (size_t c = 0; c < counts.size(); ++c) {
      check(data[c][r] == plain[c][r],
            what + ": count " + std::to_string(counts[c]) + " differs from a plain all-reduce on rank " +
                std::to_string(r));
    }
  }
}

CommunicatorOptions reducer_options() {
  CommunicatorOptions options;
  options.timeout_seconds = 30;
  options.reduction_server = true;
  options.reduction_server_settings.chunk_bytes = 1024;
  return options;
}

// Piece 0's all-reduce finishes (its drain is issued) while piece 1's copy into host memory is
// still held: the copies overlap the all-reduces. And the call returned before any copy of it
// was done; its Work was done only once the last drain was.
void test_copies_overlap_all_reduces() {
  Job job(2, 1, 0, 30);
  const size_t count = 4 * kPieceBytes / sizeof(float);  // 4 pieces, through 3 slots
  std::vector<std::vector<float>> data = {integers(0, count, 9), integers(1, count, 9)};
  const std::vector<float> expected = summed(data);
  std::vector<std::unique_ptr<ObservedEngine>> engines;
  for (int r = 0; r < 2; ++r) {
    engines.push_back(std::make_unique<ObservedEngine>(reinterpret_cast<char*>(data[r].data()), count * sizeof(float)));
    engines[r]->hold_from(1);  // piece 0's fill runs; piece 1's waits
  }
  // char, not bool: each rank's thread writes its own element (vector<bool> packs them into one word).
  std::vector<char> returned_early(2), drain_while_held(2), done_while_held(2, true), fills_first(2);
  auto errors = job.run([&](int r) {
    ObservedEngine& engine = *engines[r];
    StagedAllreduce staging(std::move(engines[r]), kPieceBytes, kSlots);
    auto work = staging.allreduce(*job.comms[r], data[r].data(), count, DataType::kFloat32, ReduceOp::kSum);
    returned_early[r] = !work->done();
    drain_while_held[r] = engine.wait_for_issue([](const ObservedEngine::Copy& c) { return !c.fill && c.offset == 0; });
    done_while_held[r] = work->done();
    const auto issued = engine.issued();
    // Fills of pieces 0..2 (one per slot) were issued at the call, before any drain.
    fills_first[r] = issued.size() >= 3 && issued[0].fill && issued[1].fill && issued[2].fill;
    engine.release();
    wait(work);
    staging.close();
  });
  for (int r = 0; r < 2; ++r) {
    const std::string rank = " on rank " + std::to_string(r);
    check(errors[r].empty(), "overlap: raised " + errors[r] + rank);
    check(returned_early[r], "overlap: the call returned only once done" + rank);
    check(drain_while_held[r], "overlap: piece 0 was not reduced while piece 1's copy was held" + rank);
    check(!done_while_held[r], "overlap: the Work was done before its copies" + rank);
    check(fills_first[r], "overlap: the first slots' fills were not all issued at the call" + rank);
    check(data[r] == expected, "overlap: wrong sum" + rank);
  }
}

// A slot is filled again only after its previous piece was drained: with one slot, every copy
// is a fill, then its drain, in piece order.
void test_a_slot_is_reused_only_once_drained() {
  Job job(2, 1, 0, 30);
  const size_t count = 5 * kPieceBytes / sizeof(float) + 7;  // 6 pieces
  std::vector<std::vector<float>> data = {integers(0, count, 3), integers(1, count, 3)};
  const std::vector<float> expected = summed(data);
  std::vector<std::vector<ObservedEngine::Copy>> issued(2);
  auto errors = job.run([&](int r) {
    auto engine = std::make_unique<ObservedEngine>(reinterpret_cast<char*>(data[r].data()), count * sizeof(float));
    ObservedEngine& observed = *engine;
    StagedAllreduce staging(std::move(engine), kPieceBytes, 1);
    wait(staging.allreduce(*job.comms[r], data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
    issued[r] = observed.issued();
    staging.close();
  });
  for (int r = 0; r < 2; ++r) {
    bool alternates = issued[r].size() == 12;
    for (size_t i = 0; alternates && i < issued[r].size(); ++i) {
      alternates = issued[r][i].fill == (i % 2 == 0) && issued[r][i].offset == i / 2 * kPieceBytes;
    }
    check(errors[r].empty() && alternates && data[r] == expected,
          "one slot: fills and drains alternate, piece by piece, on rank " + std::to_string(r) + " (" +
              message_of(errors[r]) + ")");
  }
}

// Rank 1 takes part in piece 0's all-reduce only, then aborts: rank 0's call fails with the
// reason, piece 0 is copied back (reduced), and nothing of the failed pieces is.
void test_failed_piece_fails_the_call_and_copies_nothing_back() {
  Job job(2, 1, 0, 30);
  const size_t per_piece = kPieceBytes / sizeof(float), count = 4 * per_piece;
  std::vector<std::vector<float>> data = {integers(0, count, 5), integers(1, count, 5)};
  const std::vector<float> before = data[0];
  std::vector<float> expected_piece0(per_piece);
  for (size_t i = 0; i < per_piece; ++i) expected_piece0[i] = data[0][i] + data[1][i];
  std::string error0;
  std::vector<ObservedEngine::Copy> issued;
  auto errors = job.run([&](int r) {
    if (r == 1) {
      wait(job.comms[1]->allreduce(data[1].data(), per_piece, DataType::kFloat32, ReduceOp::kSum));
      job.comms[1]->abort("test abort after piece 0");
      return;
    }
    auto engine = std::make_unique<ObservedEngine>(reinterpret_cast<char*>(data[0].data()), count * sizeof(float));
    ObservedEngine& observed = *engine;
    StagedAllreduce staging(std::move(engine), kPieceBytes, kSlots);
    auto work = staging.allreduce(*job.comms[0], data[0].data(), count, DataType::kFloat32, ReduceOp::kSum);
    try {
      wait(work);
    } catch (const CollectiveError& e) {
      error0 = e.what();
    }
    staging.close();
    issued = observed.issued();
  });
  const bool drains_of_failed = std::any_of(issued.begin(), issued.end(), [](const ObservedEngine::Copy& c) {
    return !c.fill && c.offset >= kPieceBytes;
  });
  check(error0.find("test abort after piece 0") != std::string::npos,
        "a failed piece fails the call with its reason: '" + error0 + "'");
  check(std::equal(expected_piece0.begin(), expected_piece0.end(), data[0].begin()),
        "the piece reduced before the failure is copied back");
  check(!drains_of_failed && std::equal(before.begin() + per_piece, before.end(), data[0].begin() + per_piece),
        "nothing of the failed pieces is copied back");
}

// A copy into host memory that fails fails its piece's all-reduce, which aborts the communicator
// as any failure does: both ranks' calls fail, naming the copy's error on the rank it failed on.
void test_failed_copy_fails_every_rank() {
  Job job(2, 1, 0, 30);
  const size_t count = 3 * kPieceBytes / sizeof(float);
  std::vector<std::vector<float>> data = {integers(0, count, 6), integers(1, count, 6)};
  std::vector<std::string> failures(2);
  auto errors = job.run([&](int r) {
    auto engine = std::make_unique<ObservedEngine>(reinterpret_cast<char*>(data[r].data()), count * sizeof(float));
    if (r == 0) engine->fail(1);  // piece 1's fill
    StagedAllreduce staging(std::move(engine), kPieceBytes, kSlots);
    try {
      wait(staging.allreduce(*job.comms[r], data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
    } catch (const CollectiveError& e) {
      failures[r] = e.what();
    }
    staging.close();
  });
  check(failures[0].find("injected copy failure") != std::string::npos,
        "a failed copy names its error: '" + failures[0] + "'");
  check(!failures[1].empty(), "the peer of a rank whose copy failed fails too");
}

// After close(), a call is refused; a call on a closed communicator fails its Work.
void test_closed() {
  Job job(1, 1, 0, 30);
  std::vector<float> x(10, 1.0f);
  StagedAllreduce staging(std::make_unique<HostCopyEngine>(), kPieceBytes, kSlots);
  job.comms[0]->close();
  bool failed = false;
  try {
    wait(staging.allreduce(*job.comms[0], x.data(), x.size(), DataType::kFloat32, ReduceOp::kSum));
  } catch (const CollectiveError&) {
    failed = true;
  }
  check(failed, "a staged call on a closed communicator fails");
  staging.close();
  failed = false;
  try {
    staging.allreduce(*job.comms[0], x.data(), x.size(), DataType::kFloat32, ReduceOp::kSum);
  } catch (const CollectiveError&) {
    failed = true;
  }
  check(failed, "a call after close() is refused");
}

}  // namespace

int main() {
  for (int size : {1, 2, 3}) {
    Job job(size, 1, 0, 30, always_ring());
    test_results(job, "ring, " + std::to_string(size) + " ranks");
  }
  {
    Job job(2, 2, reducer_options());
    test_results(job, "reduction server, 2 workers, 2 reducers");
  }
  test_copies_overlap_all_reduces();
  test_a_slot_is_reused_only_once_drained();
  test_failed_piece_fails_the_call_and_copies_nothing_back();
  test_failed_copy_fails_every_rank();
  test_closed();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_staging: all passed\n");
  return 0;
}
