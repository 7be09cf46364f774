// Ranks as threads in one process, over real loopback TCP and over the in-memory fake
// transport: every collective against a sequential reference, with each all-reduce algorithm
// of the ring family; the failure paths (disagreeing ranks, abort, a silent rank); and, on the
// fake, faults injected at every message of a collective. Built and run under
// AddressSanitizer and UndefinedBehaviorSanitizer in CI.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"

using namespace collectives;
using namespace collectives::testing;

namespace {

template <typename T>
DataType dtype_of();
template <> DataType dtype_of<float>() { return DataType::kFloat32; }
template <> DataType dtype_of<double>() { return DataType::kFloat64; }
template <> DataType dtype_of<int32_t>() { return DataType::kInt32; }
template <> DataType dtype_of<int8_t>() { return DataType::kInt8; }

template <typename T>
void test_allreduce(Job& job, ReduceOp op, size_t count, unsigned seed) {
  const int size = static_cast<int>(job.comms.size());
  std::vector<std::vector<T>> data(size);
  for (int r = 0; r < size; ++r) data[r] = rank_data<T>(r, count, seed);
  std::vector<T> expected = data[0];
  for (int r = 1; r < size; ++r) {
    reduce_into(expected.data(), data[r].data(), count, dtype_of<T>(), op, SimdLevel::kScalar);
  }
  if (op == ReduceOp::kAvg) divide(expected.data(), count, dtype_of<T>(), size, SimdLevel::kScalar);
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allreduce(data[r].data(), count, dtype_of<T>(), op));
  });
  std::string what = "allreduce " + std::string(to_string(dtype_of<T>())) + " " + to_string(op) +
                     " count " + std::to_string(count) + " size " + std::to_string(size);
  for (int r = 0; r < size; ++r) {
    check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
    check(data[r] == expected,
          what + ": wrong result on rank " + std::to_string(r));
  }
}

// Inputs whose reductions depend on the order of the operations: exponents far apart, zeros of
// both signs, and NaNs of different payloads (the kernels keep the destination's on a tie).
template <typename T>
std::vector<T> order_sensitive_data(int rank, size_t count, unsigned seed) {
  std::mt19937 gen(seed * 7919 + rank);
  std::uniform_real_distribution<T> mantissa(-1, 1);
  std::uniform_int_distribution<int> kind(0, 19), exponent(-30, 30);
  std::vector<T> v(count);
  for (auto& x : v) {
    switch (kind(gen)) {
      case 0: x = T(0.0); break;
      case 1: x = T(-0.0); break;
      case 2: x = std::nan(std::to_string(rank + 1).c_str()); break;
      default: x = std::ldexp(mantissa(gen), exponent(gen));
    }
  }
  return v;
}

// Whatever order an algorithm reduces in, every rank must end with the same bits.
template <typename T>
void test_every_rank_same_bits(Job& job, ReduceOp op, size_t count, unsigned seed) {
  const int size = static_cast<int>(job.comms.size());
  std::vector<std::vector<T>> data(size);
  for (int r = 0; r < size; ++r) data[r] = order_sensitive_data<T>(r, count, seed);
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allreduce(data[r].data(), count, dtype_of<T>(), op));
  });
  const std::string what = "same bits: allreduce " + std::string(to_string(dtype_of<T>())) + " " +
                           to_string(op) + " count " + std::to_string(count) + " size " +
                           std::to_string(size);
  for (int r = 0; r < size; ++r) {
    check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
    // Not for count 0: an empty vector's data() may be null, which memcmp must never get.
    check(count == 0 || std::memcmp(data[r].data(), data[0].data(), count * sizeof(T)) == 0,
          what + ": rank " + std::to_string(r) + " differs from rank 0");
  }
}

void test_other_collectives(Job& job, size_t count) {
  const int size = static_cast<int>(job.comms.size());
  std::string where = " count " + std::to_string(count) + " size " + std::to_string(size);
  // allgather: block r of every output is rank r's input.
  std::vector<std::vector<int32_t>> in(size), out(size, std::vector<int32_t>(count * size));
  for (int r = 0; r < size; ++r) in[r] = rank_data<int32_t>(r, count, 7);
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allgather(in[r].data(), out[r].data(), count, DataType::kInt32));
  });
  for (int r = 0; r < size; ++r) {
    check(errors[r].empty(), "allgather raised " + errors[r]);
    for (int b = 0; b < size; ++b) {
      check(std::equal(in[b].begin(), in[b].end(), out[r].begin() + b * count),
            "allgather block " + std::to_string(b) + " on rank " + std::to_string(r) + where);
    }
  }
  // broadcast from every root.
  for (int root = 0; root < size; ++root) {
    std::vector<std::vector<int32_t>> data(size);
    for (int r = 0; r < size; ++r) data[r] = rank_data<int32_t>(r, count, 11);
    auto expected = data[root];
    errors = job.run([&](int r) {
      wait(job.comms[r]->broadcast(data[r].data(), count, DataType::kInt32, root));
    });
    for (int r = 0; r < size; ++r) {
      check(errors[r].empty() && data[r] == expected,
            "broadcast root " + std::to_string(root) + " rank " + std::to_string(r) + where);
    }
  }
  // reduce_scatter: rank r gets block r of the sum.
  std::vector<std::vector<int32_t>> full(size), part(size, std::vector<int32_t>(count));
  std::vector<int32_t> sum(count * size, 0);
  for (int r = 0; r < size; ++r) {
    full[r] = rank_data<int32_t>(r, count * size, 13);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += full[r][i];
  }
  errors = job.run([&](int r) {
    wait(job.comms[r]->reduce_scatter(full[r].data(), part[r].data(), count, DataType::kInt32,
                                      ReduceOp::kSum));
  });
  for (int r = 0; r < size; ++r) {
    check(errors[r].empty() && std::equal(part[r].begin(), part[r].end(), sum.begin() + r * count),
          "reduce_scatter rank " + std::to_string(r) + where);
  }
  errors = job.run([&](int r) { wait(job.comms[r]->barrier()); });
  for (int r = 0; r < size; ++r) check(errors[r].empty(), "barrier raised " + errors[r]);
}

void test_mismatch_fails_everywhere() {
  Job job(3, 1, 0, 20);
  std::vector<std::vector<float>> data(3, std::vector<float>(1001, 1.0f));
  auto errors = job.run([&](int r) {
    size_t count = r == 1 ? 1001 : 1000;  // rank 1 disagrees
    wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
  });
  for (int r = 0; r < 3; ++r) {
    check(!errors[r].empty(), "mismatch: rank " + std::to_string(r) + " did not raise");
    check(errors[r].find("allreduce #0") != std::string::npos,
          "mismatch message names the collective: " + errors[r]);
  }
  // The communicator is aborted: the next collective fails at once.
  auto later = job.run([&](int r) { wait(job.comms[r]->barrier()); });
  for (int r = 0; r < 3; ++r) check(!later[r].empty(), "collective after a failure must fail");
}

void test_abort_wakes_peers() {
  Job job(2, 1, 0, 30);
  std::vector<float> data(10, 1.0f);
  auto errors = job.run([&](int r) {
    if (r == 0) {
      job.comms[0]->abort("test abort");
      return;
    }
    wait(job.comms[1]->allreduce(data.data(), data.size(), DataType::kFloat32, ReduceOp::kSum));
  });
  check(errors[1].find("test abort") != std::string::npos,
        "abort reason reaches the peer: '" + errors[1] + "'");
}

// Work::when_done (the C API's completion): each callback runs once, with the collective's
// error; one registered after the end runs at once, on the caller's thread.
void test_when_done() {
  Job job(2, 1, 0, 30);
  std::vector<std::vector<float>> data(2, std::vector<float>(1000, 1.0f));
  auto message_of = [](std::exception_ptr error) -> std::string {
    if (!error) return "";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      return e.what();
    }
  };
  // Waiters are woken before the callbacks run (on the communicator's thread): what a callback
  // saw is read from its promise, never from a variable it may still be writing.
  std::vector<std::promise<std::string>> heard(2);
  auto errors = job.run([&](int r) {
    auto work = job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum);
    work->when_done([&, r](std::exception_ptr error) { heard[r].set_value(message_of(error)); });
    wait(work);
    bool at_once = false;
    work->when_done([&](std::exception_ptr) { at_once = true; });
    check(at_once, "a callback registered after the end runs at once");
  });
  for (int r = 0; r < 2; ++r) {
    std::future<std::string> seen = heard[r].get_future();
    const bool called = seen.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
    const std::string message = called ? seen.get() : "not called";
    check(errors[r].empty() && message.empty() && data[r][999] == 2.0f,
          "when_done after a successful all-reduce: " + errors[r] + message);
  }
  std::promise<std::string> failure_heard;
  errors = job.run([&](int r) {
    if (r == 0) {
      job.comms[0]->abort("test abort");
      return;
    }
    auto work = job.comms[1]->allreduce(data[1].data(), data[1].size(), DataType::kFloat32, ReduceOp::kSum);
    work->when_done([&](std::exception_ptr error) { failure_heard.set_value(message_of(error)); });
    wait(work);
  });
  std::future<std::string> seen = failure_heard.get_future();
  const std::string message =
      seen.wait_for(std::chrono::seconds(10)) == std::future_status::ready ? seen.get() : "not called";
  check(message.find("test abort") != std::string::npos, "when_done hears a failure: '" + message + "'");
}

// Every rank but the one that aborts waits in an all-reduce: each hears the reason, over
// whichever link reaches it (routed: a part that fails fails the whole, so a rank told over TCP
// tells its shared-memory peers in turn).
void test_abort_reaches_every_rank(int size) {
  Job job(size, 1, 0, 30);
  std::vector<std::vector<float>> data(size, std::vector<float>(1000, 1.0f));
  auto errors = job.run([&](int r) {
    if (r == 0) return job.comms[0]->abort("test abort");
    wait(job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum));
  });
  for (int r = 1; r < size; ++r) {
    check(errors[r].find("test abort") != std::string::npos,
          "abort among " + std::to_string(size) + ": rank " + std::to_string(r) + " said '" + errors[r] + "'");
  }
}

/*
 * Receives from any source (Communicator::recv_any), on the real transports. Rank 0 takes
 * `rounds` messages from every other rank on one tag through receives from any source, all
 * posted at once, while rank 1 also sends it messages of another tag, taken by receives for
 * rank 1 alone: each message must land whole and unchanged (its elements say its sender and its
 * round), each rank's messages in the order sent, every source said, and no message of the
 * other tag taken. Then the posting order on one tag: a receive for rank 1 posted before one
 * from any source takes rank 1's first message, and the other way round.
 */
void test_receive_from_any_source(int size, size_t count, int rounds) {
  const std::string where = "recv_any, size " + std::to_string(size) + ", count " + std::to_string(count);
  Job job(size);
  auto value = [](int sender, int round, size_t i) { return static_cast<int32_t>(sender * 1000003 + round * 7919 + i); };
  const int messages = (size - 1) * rounds;
  std::vector<std::vector<int32_t>> got(messages, std::vector<int32_t>(count)), other(rounds, std::vector<int32_t>(count));
  std::vector<int> sources(messages, -1);
  auto errors = job.run([&](int r) {
    Communicator& comm = *job.comms[r];
    if (r == 0) {
      std::vector<std::shared_ptr<Work>> any, own;
      for (int k = 0; k < messages; ++k) any.push_back(comm.recv_any(got[k].data(), count, DataType::kInt32, 5));
      for (int k = 0; k < rounds; ++k) own.push_back(comm.recv(other[k].data(), count, DataType::kInt32, 1, 6));
      for (int k = 0; k < messages; ++k) {
        wait(any[k]);
        sources[k] = any[k]->source();
      }
      for (auto& work : own) wait(work);
      return;
    }
    std::vector<std::vector<int32_t>> out(rounds, std::vector<int32_t>(count)), aside(rounds, std::vector<int32_t>(count));
    std::vector<std::shared_ptr<Work>> sent;
    for (int k = 0; k < rounds; ++k) {
      for (size_t i = 0; i < count; ++i) out[k][i] = value(r, k, i);
      for (size_t i = 0; i < count; ++i) aside[k][i] = -value(r, k, i);
      if (r == 1) sent.push_back(comm.send(aside[k].data(), count, DataType::kInt32, 0, 6));
      sent.push_back(comm.send(out[k].data(), count, DataType::kInt32, 0, 5));
    }
    for (auto& work : sent) wait(work);
  });
  for (int r = 0; r < size; ++r) check(errors[r].empty(), where + ": rank " + std::to_string(r) + " raised " + errors[r]);
  std::vector<int> next_round(size, 0);
  for (int k = 0; k < messages; ++k) {
    const int from = sources[k];
    if (from < 1 || from >= size) {
      check(false, where + ": message " + std::to_string(k) + " says it came from rank " + std::to_string(from));
      continue;
    }
    const int round = next_round[from]++;
    bool exact = true;
    for (size_t i = 0; i < count; ++i) exact &= got[k][i] == value(from, round, i);
    check(exact, where + ": message " + std::to_string(k) + " from rank " + std::to_string(from) + " is not its round " +
                     std::to_string(round) + " (out of order, another tag's, or altered)");
  }
  for (int r = 1; r < size; ++r) check(next_round[r] == rounds, where + ": rank " + std::to_string(r) + "'s messages");
  for (int k = 0; k < rounds; ++k) {
    bool exact = true;
    for (size_t i = 0; i < count; ++i) exact &= other[k][i] == -value(1, k, i);
    check(exact, where + ": tag 6 message " + std::to_string(k) + " from rank 1");
  }
  // Posting order on one tag, both ways: rank 1 sends 1 then 2.
  for (bool any_first : {false, true}) {
    int32_t first = 0, second = 0;
    std::shared_ptr<Work> any;
    errors = job.run([&](int r) {
      if (r == 1) {
        int32_t one = 1, two = 2;
        wait(job.comms[1]->send(&one, 1, DataType::kInt32, 0, 7));
        wait(job.comms[1]->send(&two, 1, DataType::kInt32, 0, 7));
      } else if (r == 0) {
        std::shared_ptr<Work> own;
        if (!any_first) own = job.comms[0]->recv(&first, 1, DataType::kInt32, 1, 7);
        any = job.comms[0]->recv_any(any_first ? &first : &second, 1, DataType::kInt32, 7);
        if (any_first) own = job.comms[0]->recv(&second, 1, DataType::kInt32, 1, 7);
        wait(own);
        wait(any);
      }
    });
    const std::string order = where + (any_first ? ": any source posted first" : ": rank 1's posted first");
    for (int r = 0; r < size; ++r) check(errors[r].empty(), order + ": rank " + std::to_string(r) + " raised " + errors[r]);
    check(first == 1 && second == 2, order + ": got " + std::to_string(first) + ", " + std::to_string(second));
    check(any->source() == 1, order + ": source " + std::to_string(any->source()));
  }
}

// The transport numbers point-to-point messages as it matches them (with receives from any
// source the receiver cannot number them at posting): a message whose sender's number is not the
// next of its lane fails the receive, for its sender or from any source, before a byte lands.
void test_point_to_point_numbers_are_checked() {
  for (bool any_source : {false, true}) {
    const std::vector<std::string> names{"rank 0", "rank 1"};
    auto transports = real_transports(2, 1, names);
    CollectiveTag tag{CollectiveKind::kSendRecv, 1, 1, DataType::kInt32, ReduceOp::kSum, 0, 42};
    const FrameHeader skipped = tag.header(0, sizeof(int32_t));  // number 1, where 0 is due
    int32_t sent = 7, got = 0;
    TransportRequest send = transports[1]->send(0, skipped, &sent);
    tag.seq = 0;
    const FrameHeader expected = tag.header(0, sizeof(int32_t));
    TransportRequest recv = any_source ? transports[0]->recv_any({1}, expected, &got) : transports[0]->recv(1, expected, &got);
    std::string error;
    try {
      transports[0]->wait(recv, deadline_after(20));
    } catch (const CollectiveError& e) {
      error = e.what();
    }
    const std::string where = std::string("point-to-point numbers, ") + (any_source ? "from any source" : "per peer");
    check(error.find("send/recv #1") != std::string::npos && error.find("send/recv #0") != std::string::npos,
          where + ": said '" + error + "'");
    check(got == 0, where + ": the payload landed");
    for (auto& t : transports) t->abort("test over");
  }
}

// A receive from any source that no message comes for: an abort ends it at once, with the
// reason, and so does closing the communicator; the ranks it waits on closing theirs end it too.
void test_pending_receive_from_any_source_ends(int size) {
  for (const char* how : {"abort", "close", "others close", "timeout"}) {
    const std::string where = std::string("pending recv_any, ") + how + ", size " + std::to_string(size);
    const bool times_out = std::string(how) == "timeout";
    Job job(size, 1, 0, times_out ? 1 : 30);
    std::vector<int32_t> buffer(1000);
    std::shared_ptr<Work> work = job.comms[0]->recv_any(buffer.data(), buffer.size(), DataType::kInt32, 3);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto start = std::chrono::steady_clock::now();
    if (std::string(how) == "abort") {
      job.comms[0]->abort("test abort");
    } else if (std::string(how) == "close") {
      job.comms[0]->close();
    } else if (!times_out) {
      for (int r = 1; r < size; ++r) job.comms[r]->close();
    }
    std::string error;
    try {
      while (!work->wait_for(1.0) && std::chrono::steady_clock::now() - start < std::chrono::seconds(20)) {
      }
    } catch (const CollectiveError& e) {
      error = e.what();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::string said = std::string(how) == "abort"   ? "test abort"
                             : std::string(how) == "close" ? "the communicator was closed before the message was done"
                             : times_out ? "from any of " + std::to_string(size - 1) + " ranks; rank 1 waits to receive from no rank"
                                         : "has closed its communicator";
    check(error.find(said) != std::string::npos, where + ": said '" + error + "'");
    check(seconds < 5, where + ": ended after " + std::to_string(seconds) + " s");
  }
}

// Whether a timeout names `culprit` as the rank it waited for, directly or at the end of a chain
// of waiting ranks, and blames no other rank for not sending.
bool names_only(const std::string& error, int culprit) {
  const std::string named = "rank " + std::to_string(culprit);
  const bool direct = error.find("timed out waiting for " + named + " to send") != std::string::npos;
  const bool chained = error.find(": " + named + " did not answer") != std::string::npos ||
                       error.find(": " + named + " waits to receive from no rank") != std::string::npos;
  const bool blames_another = error.find(" to send message") != std::string::npos && !direct;
  return (direct || chained) && !blames_another;
}

// The last rank never calls the all-reduce. On the ring, rank 0 waits on it, rank 1 waits on
// rank 0, rank 2 on rank 1, and so on: nobody may blame a healthy rank that waits too; every
// rank names the silent one, whichever times out first and however far along the chain.
// An average of integers: refused by the communicator itself (the one check, whichever entry
// queues it: Python, the C API), before anything is sent.
void test_average_of_integers_is_refused() {
  Job job(2);
  int32_t data[4] = {}, part[2] = {};
  const std::string expected = "op 'avg' needs a floating dtype, not int32: use 'sum' and divide";
  const std::vector<std::pair<std::string, std::function<void()>>> calls{
      {"allreduce", [&] { job.comms[0]->allreduce(data, 4, DataType::kInt32, ReduceOp::kAvg); }},
      {"reduce_scatter", [&] { job.comms[0]->reduce_scatter(data, part, 2, DataType::kInt32, ReduceOp::kAvg); }},
      {"reduce", [&] { job.comms[0]->reduce(data, 4, DataType::kInt32, ReduceOp::kAvg, 0); }}};
  for (const auto& [name, call] : calls) {
    std::string said;
    try {
      call();
    } catch (const std::invalid_argument& e) {
      said = e.what();
    }
    check(said == expected, name + " of int32 by avg: said '" + said + "'");
  }
}

void test_silent_rank_is_named_not_its_neighbour(int size) {
  Job job(size, 1, 0, 1.0, always_ring());
  const int silent = size - 1;
  std::vector<std::vector<float>> data(size, std::vector<float>(100000, 1.0f));
  auto errors = job.run([&](int r) {
    if (r == silent) return;
    wait(job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum));
  });
  for (int r = 0; r < silent; ++r) {
    check(names_only(errors[r], silent), "silent rank among " + std::to_string(size) + ": rank " + std::to_string(r) +
                                             " must name rank " + std::to_string(silent) + " only, said '" + errors[r] + "'");
  }
}

// Copies one direction of a relayed connection, changing byte `altered_at` of the stream (if
// it comes), as an attacker on the path would; ends the other side when this one ends.
void relay(int from, int to, size_t altered_at) {
  char buf[4096];
  size_t offset = 0;
  for (;;) {
    ssize_t got = ::recv(from, buf, sizeof(buf), 0);
    if (got <= 0) break;
    if (altered_at >= offset && altered_at < offset + static_cast<size_t>(got)) buf[altered_at - offset] ^= 1;
    offset += static_cast<size_t>(got);
    if (::send(to, buf, static_cast<size_t>(got), MSG_NOSIGNAL) != got) break;
  }
  ::shutdown(to, SHUT_WR);
}

// Two ranks whose connection runs through a relay that flips one bit of the first frame's
// payload: with protection the frame is refused and both ranks raise, naming the check;
// without (kNone, the control that shows the test can fail) rank 1's sum is silently wrong.
// On the ring, which needs rank 1's second message, so rank 0 cannot finish first (with
// recursive doubling it could, rightly: the one frame it receives is intact).
void test_altered_frame_is_refused() {
  const size_t count = 1000;
  auto [at_rank0, relay_end0] = loopback_pair();
  auto [relay_end1, at_rank1] = loopback_pair();
  const std::string to_rank1 = random_key(), to_rank0 = random_key();
  std::vector<std::vector<std::vector<Link>>> links(2, std::vector<std::vector<Link>>(2));
  links[0][1].push_back(Link{at_rank0, job_security, to_rank1, to_rank0});
  links[1][0].push_back(Link{at_rank1, job_security, to_rank0, to_rank1});
  std::thread forward(relay, relay_end0, relay_end1, sizeof(FrameHeader) + 5);
  std::thread backward(relay, relay_end1, relay_end0, SIZE_MAX);
  CommunicatorOptions options;
  options.timeout_seconds = 20;
  options.cost = always_ring();
  const std::vector<std::string> names{"rank 0", "rank 1"};
  std::vector<std::vector<float>> data(2);
  std::vector<std::string> errors(2);
  {
    std::vector<std::unique_ptr<Communicator>> comms;
    for (int r = 0; r < 2; ++r) {
      comms.push_back(std::make_unique<Communicator>(std::make_unique<TcpTransport>(r, 2, links[r], names), options));
    }
    std::vector<std::thread> ranks;
    for (int r = 0; r < 2; ++r) {
      data[r].assign(count, static_cast<float>(r + 1));
      ranks.emplace_back([&, r] {
        try {
          wait(comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    }
    for (auto& t : ranks) t.join();
  }
  forward.join();
  backward.join();
  for (int fd : {relay_end0, relay_end1}) ::close(fd);
  const std::string mode = to_string(job_security);
  if (job_security == WireSecurity::kNone) {
    const bool right = errors[1].empty() && std::all_of(data[1].begin(), data[1].end(), [](float x) { return x == 3.0f; });
    check(!right, "kNone: the altered frame went unnoticed, as expected without protection");
    return;
  }
  for (int r = 0; r < 2; ++r) {
    check(errors[r].find("failed its integrity check") != std::string::npos,
          mode + ": rank " + std::to_string(r) + " must raise naming the integrity check, raised '" + errors[r] + "'");
  }
}

}  // namespace

// The fake transport: the messages `culprit` sends in one all-reduce, counted on a clean run.
uint64_t messages_sent(CostModel cost, int size, int culprit, size_t count) {
  Job job(size, 1, 0, 20, cost);
  std::vector<std::vector<float>> data(size, std::vector<float>(count, 1.0f));
  job.run([&](int r) { wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum)); });
  const uint64_t messages = job.network->sent(culprit);
  check(messages > 0, "fault injection: rank " + std::to_string(culprit) + " sent nothing");
  return messages;
}

// Fault injection (the fake transport): rank `culprit` fails at each of its messages of an
// all-reduce in turn. The culprit and every rank that needed the message raise, naming the
// injected failure; a rank that needed nothing more of the culprit may finish, but hears of
// the failure all the same: every rank's next collective fails at once.
void test_failure_at_every_message(CostModel cost, int size, int culprit, size_t count) {
  const uint64_t messages = messages_sent(cost, size, culprit, count);
  for (uint64_t k = 0; k < messages; ++k) {
    Job job(size, 1, 0, 20, cost);
    job.network->inject(culprit, k, FakeNetwork::Fault::kAbort);
    std::vector<std::vector<float>> data(size, std::vector<float>(count, 1.0f));
    auto errors = job.run([&](int r) {
      wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
    });
    const std::string where = "failure at message " + std::to_string(k) + " of rank " +
                              std::to_string(culprit) + ", size " + std::to_string(size) + ": rank ";
    int raised = 0;
    for (int r = 0; r < size; ++r) {
      if (errors[r].empty()) continue;
      ++raised;
      check(errors[r].find("injected failure at message " + std::to_string(k)) != std::string::npos,
            where + std::to_string(r) + " must name it, raised '" + errors[r] + "'");
    }
    check(!errors[culprit].empty() && raised > 1, where + "the culprit and a peer that needed the message must raise");
    auto later = job.run([&](int r) { wait(job.comms[r]->barrier()); });
    for (int r = 0; r < size; ++r) check(!later[r].empty(), where + std::to_string(r) + ": the next collective must fail");
  }
}

// The fake transport: a rank falls silent at its k-th message (a hung process). A rank that
// needs what it did not send must name it, not a neighbour that waits on it too, however long
// the chain of waits between them; the others finish (the silent rank's earlier messages were
// all they needed).
void test_silent_rank_named_at(CostModel cost, int size, int culprit, size_t count) {
  const uint64_t messages = messages_sent(cost, size, culprit, count);
  for (uint64_t k : {uint64_t{0}, messages / 2, messages - 1}) {
    if (k > 0 && k == messages / 2 && messages / 2 == messages - 1) continue;
    Job job(size, 1, 0, 0.5, cost);
    job.network->inject(culprit, k, FakeNetwork::Fault::kSilent);
    std::vector<std::vector<float>> data(size, std::vector<float>(count, 1.0f));
    auto errors = job.run([&](int r) {
      wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
    });
    const std::string where = "silent at message " + std::to_string(k) + ", size " + std::to_string(size) + ": ";
    int raised = 0;
    for (int r = 0; r < size; ++r) {
      if (r == culprit || errors[r].empty()) continue;
      ++raised;
      check(names_only(errors[r], culprit),
            where + "rank " + std::to_string(r) + " must name rank " + std::to_string(culprit) + ", said '" + errors[r] + "'");
    }
    check(raised > 0, where + "no rank noticed");
  }
}

// Every test, under job_transport (and job_security for TCP).
// Subgroups over the world's connections: evens {0, 2, ...} and odds in reverse order, plus a
// second world-sized subgroup over the same list of ranks as a first one (their ids must
// differ). Each rank runs an all-reduce on its half, one on each world-sized subgroup and one
// on the world, all at once, in an order that differs between ranks: each must still get its
// own communicator's sum.
void test_subgroups(Job& job, size_t count) {
  const int size = static_cast<int>(job.comms.size());
  std::vector<int> evens, odds, everyone;
  for (int r = 0; r < size; ++r) (r % 2 ? odds : evens).insert(r % 2 ? odds.begin() : evens.end(), r);
  for (int r = 0; r < size; ++r) everyone.push_back(r);
  const std::string where = "subgroups, count " + std::to_string(count) + ", size " + std::to_string(size) + ": ";
  auto errors = job.run([&](int r) {
    auto half = job.comms[r]->subgroup(r % 2 ? odds : evens);
    auto first = job.comms[r]->subgroup(everyone), second = job.comms[r]->subgroup(everyone);
    if (half->members() != (r % 2 ? odds : evens)) throw std::runtime_error("the half's members differ");
    // Values that tell the communicators apart: 1 per rank on the half, 10 on the first,
    // 100 on the second, 1000 on the world.
    std::vector<std::vector<int32_t>> data(4);
    const int32_t scales[4] = {1, 10, 100, 1000};
    Communicator* comms[4] = {half.get(), first.get(), second.get(), job.comms[r].get()};
    for (int c = 0; c < 4; ++c) data[c].assign(count, scales[c]);
    std::vector<std::shared_ptr<Work>> works(4);
    for (int step = 0; step < 4; ++step) {
      const int c = (step + r) % 4;  // each rank starts at another communicator
      works[c] = comms[c]->allreduce(data[c].data(), count, DataType::kInt32, ReduceOp::kSum);
    }
    for (auto& work : works) wait(work);
    for (int c = 0; c < 4; ++c) {
      const int32_t expected = scales[c] * (c == 0 ? half->size() : size);
      if (count > 0 && (data[c].front() != expected || data[c].back() != expected)) {
        throw std::runtime_error("communicator " + std::to_string(c) + " got " + std::to_string(data[c].front()) +
                                 ", expected " + std::to_string(expected));
      }
    }
  });
  for (int r = 0; r < size; ++r) check(errors[r].empty(), where + "rank " + std::to_string(r) + " raised " + errors[r]);
}

// The hierarchical algorithm (hierarchy.h, allreduce_hierarchical.h), forced by its cost model (levels that
// cost nothing against flat links of a second per message), over uneven plans: 5 ranks as 3 + 2
// on two hosts, and 7 ranks on three hosts in two racks: {0, 1, 2} and {3, 4} in one, {5, 6}
// in the other. The rank past the fewest ranks on a host (2), and the second host of the first
// rack (past the fewest hosts in a rack, 1), carry nothing up.
HierarchyPlan hierarchy(const std::vector<std::vector<std::vector<int>>>& levels) {
  HierarchyPlan plan;
  const char* names[] = {"host", "rack", "top"};
  for (size_t l = 0; l < levels.size(); ++l) plan.levels.push_back({names[l], levels[l], CostModel{0, 0}});
  plan.description = "hierarchical(test)";
  return plan;
}

//
// And uniform plans, where all-gather and reduce-scatter take the plan too (the broadcast takes
// it everywhere): 4 ranks as 2 hosts of 2, interleaved (ranks 0 and 2 on one host), and 8 as 2
// ranks per host, 2 hosts per rack, 2 racks.
void test_hierarchical() {
  const std::vector<std::pair<int, HierarchyPlan>> layouts{
      {5, hierarchy({{{0, 1, 2}, {3, 4}}, {{0, 3}, {1, 4}}})},
      {7, hierarchy({{{0, 1, 2}, {3, 4}, {5, 6}}, {{0, 3}, {1, 4}, {5}, {6}}, {{0, 5}, {1, 6}}})},
      {4, hierarchy({{{0, 2}, {1, 3}}, {{0, 1}, {2, 3}}})},
      {8, hierarchy({{{0, 1}, {2, 3}, {4, 5}, {6, 7}}, {{0, 2}, {1, 3}, {4, 6}, {5, 7}}, {{0, 4}, {1, 5}, {2, 6}, {3, 7}}})},
  };
  for (const auto& [size, plan] : layouts) {
    CommunicatorOptions options;
    options.cost = {1.0, 1.0};
    options.hierarchy = plan;
    for (size_t segment : {size_t{0}, size_t{4096}}) {
      options.segment_bytes = segment;
      Job job(size, 0, options);
      unsigned seed = 1000;
      for (size_t count : {size_t{0}, size_t{1}, size_t{2}, size_t{5}, size_t{997}, size_t{100003}}) {
        // The plan treats every op alike but avg (divided once, at the top): min and max stand
        // with prod, which the flat matrix covers.
        for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kProd}) {
          test_allreduce<float>(job, op, count, ++seed);
          test_every_rank_same_bits<float>(job, op, count, ++seed);
        }
        test_allreduce<int32_t>(job, ReduceOp::kSum, count, ++seed);
        test_allreduce<double>(job, ReduceOp::kAvg, count, ++seed);
        test_allreduce<int8_t>(job, ReduceOp::kProd, count, ++seed);
        test_other_collectives(job, count);
      }
      // Pieces: 12 MiB of float32 goes through the plan as 12 pieces, the levels' threads
      // overlapping (hierarchy.h); the other collectives over 300007 x size int32 likewise.
      if (segment == 0) {
        test_allreduce<float>(job, ReduceOp::kSum, (3 << 20) + 7, ++seed);
        test_every_rank_same_bits<float>(job, ReduceOp::kAvg, (3 << 20) + 7, ++seed);
        test_other_collectives(job, 300007);
      }
    }
  }
  // Plans that break the rules are refused, naming the level.
  const Group world = Group::world(4, 0);
  for (const auto& [bad, why] : std::vector<std::pair<HierarchyPlan, std::string>>{
           {hierarchy({{{0, 1}, {2}}, {{0, 2}}}), "rank 3 carries data to this level but is in no group"},
           {hierarchy({{{0, 1}, {2, 3}}, {{0, 2}, {1, 2}}}), "rank 2 is in two groups"},
           {hierarchy({{{0, 1, 2}, {3}}, {{0, 3}, {1}}}), "rank 1 carries no data here"},
           {hierarchy({{{0, 1}, {2, 3}}, {{0, 3}, {1, 2}}}), "not the data of its group's first member"}}) {
    std::string error;
    try {
      Hierarchy refused(bad, world);
    } catch (const std::invalid_argument& e) {
      error = e.what();
    }
    check(error.find(why) != std::string::npos, "bad hierarchical plan: expected '" + why + "', got '" + error + "'");
  }
}

// The host's board (allreduce_board.h): every op at counts that take one barrier, two, and
// more than one slot; a call that differs, an abort and a silent rank, as on the other paths.
void run_board() {
  job_board = true;
  job_transport = TransportKind::kShm;
  const size_t per_slot = kBoardSlotBytes / sizeof(float);
  unsigned seed = 1000;
  for (int size : {2, 3, 4}) {
    Job job(size);
    for (size_t count : {size_t{0}, size_t{1}, size_t{997}, size_t{100003}, per_slot + 5, 2 * per_slot + 3}) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax, ReduceOp::kProd}) {
        test_allreduce<float>(job, op, count, ++seed);
        test_allreduce<int32_t>(job, op == ReduceOp::kAvg ? ReduceOp::kSum : op, count, ++seed);
        test_every_rank_same_bits<float>(job, op, count, ++seed);
      }
      test_allreduce<double>(job, ReduceOp::kAvg, count, ++seed);
      test_allreduce<int8_t>(job, ReduceOp::kSum, count, ++seed);
    }
  }
  // Once the board is agreed on (the first call), ranks that call differently fail at once, not at
  // the deadline (20 s): at the board's header check (two counts), or where one rank runs
  // another collective (a broadcast, a barrier), from the call each rank announced; a rank that
  // aborts wakes the others.
  auto warmed_up = [](Job& job) {
    std::vector<std::vector<float>> warm(job.comms.size(), std::vector<float>(4, 1.0f));
    auto errors = job.run([&](int r) { wait(job.comms[r]->allreduce(warm[r].data(), 4, DataType::kFloat32, ReduceOp::kSum)); });
    for (auto& e : errors) check(e.empty(), "board warm-up raised " + e);
  };
  for (int variant = 0; variant < 3; ++variant) {
    Job job(3, 1, 0, 20);
    warmed_up(job);
    std::vector<std::vector<float>> data(3, std::vector<float>(1001, 1.0f));
    const auto start = Clock::now();
    auto errors = job.run([&](int r) {
      if (r == 1 && variant == 1) return wait(job.comms[r]->broadcast(data[r].data(), 1000, DataType::kFloat32, 0));
      if (r == 1 && variant == 2) return wait(job.comms[r]->barrier());
      wait(job.comms[r]->allreduce(data[r].data(), r == 1 ? 1001 : 1000, DataType::kFloat32, ReduceOp::kSum));
    });
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    for (int r = 0; r < 3; ++r) {
      check(!errors[r].empty() && errors[r].find("#1") != std::string::npos,
            "board mismatch " + std::to_string(variant) + ": rank " + std::to_string(r) + " said '" + errors[r] + "'");
    }
    check(seconds < 10, "board mismatch " + std::to_string(variant) + " took " + std::to_string(seconds) + " s");
  }
  {
    Job job(4, 1, 0, 30);
    warmed_up(job);
    std::vector<std::vector<float>> data(4, std::vector<float>(1000, 1.0f));
    auto errors = job.run([&](int r) {
      if (r == 0) return job.comms[0]->abort("test abort");
      wait(job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum));
    });
    for (int r = 1; r < 4; ++r) {
      check(errors[r].find("test abort") != std::string::npos, "board abort: rank " + std::to_string(r) + " said '" + errors[r] + "'");
    }
  }
  // A rank without the board: the first call finds out, and every rank goes by messages.
  job_board_missing = 1;
  {
    Job job(3);
    for (size_t count : {size_t{5}, size_t{100003}}) test_allreduce<float>(job, ReduceOp::kSum, count, ++seed);
  }
  job_board_missing = -1;
  {
    Job job(3, 1, 0, 1.0);
    std::vector<std::vector<float>> data(3, std::vector<float>(1000, 1.0f));
    auto errors = job.run([&](int r) {
      // The first call agrees on the board by messages; the second waits at the board.
      wait(job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum));
      if (r == 2) return;
      wait(job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum));
    });
    for (int r = 0; r < 2; ++r) {
      check(errors[r].find("rank 2 did not reach the shared-memory barrier") != std::string::npos,
            "board: rank " + std::to_string(r) + " must name the silent rank 2, said '" + errors[r] + "'");
    }
  }
  job_board = false;
}

void run_all() {
  for (int size = 1; size <= 5; ++size) {
    for (int connections : {1, 2}) {
      // A small segment size gives many pipelined segments per block. The cost model's choice
      // (by count), then each algorithm of the ring family at every count (under one wire
      // security: the algorithms do not see it).
      for (auto [segment, cost] : {std::pair{size_t{0}, CostModel{}}, std::pair{size_t{4096}, CostModel{}},
                                   std::pair{size_t{0}, always_ring()},
                                   std::pair{size_t{0}, always_recursive_doubling()}}) {
        const bool forced = cost.alpha_seconds != CostModel{}.alpha_seconds;
        if (forced && job_transport == TransportKind::kTcp && job_security != WireSecurity::kMac) continue;
        Job job(size, connections, segment, 30, cost);
        unsigned seed = 1;
        for (size_t count : {size_t{0}, size_t{1}, size_t{2}, size_t{5}, size_t{997}, size_t{100003}}) {
          for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax,
                              ReduceOp::kProd}) {
            test_allreduce<float>(job, op, count, ++seed);
            test_allreduce<int32_t>(job, op == ReduceOp::kAvg ? ReduceOp::kSum : op, count, ++seed);
            test_every_rank_same_bits<float>(job, op, count, ++seed);
          }
          test_allreduce<double>(job, ReduceOp::kAvg, count, ++seed);
          test_allreduce<int8_t>(job, ReduceOp::kSum, count, ++seed);
          test_every_rank_same_bits<double>(job, ReduceOp::kSum, count, ++seed);
          test_other_collectives(job, count);
        }
      }
    }
  }
  for (int size : {3, 4}) {
    Job job(size);
    for (size_t count : {size_t{3}, size_t{100000}}) test_subgroups(job, count);
  }
  // The plan sees the transport, not how it protects frames: once over TCP is enough.
  if (job_transport != TransportKind::kTcp || job_security == WireSecurity::kMac) test_hierarchical();
  test_mismatch_fails_everywhere();
  test_abort_wakes_peers();
  test_when_done();
  test_abort_reaches_every_rank(4);
  if (job_transport == TransportKind::kFake) {
    Job job(2);
    int32_t x = 0;
    bool refused = false;
    try {
      job.comms[0]->recv_any(&x, 1, DataType::kInt32, 0);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    check(refused, "recv_any over a transport that cannot must be refused");
    test_average_of_integers_is_refused();
  } else {
    for (int size : {2, 4}) {
      for (size_t count : {size_t{1}, size_t{5000}, size_t{100003}}) test_receive_from_any_source(size, count, 4);
      test_pending_receive_from_any_source_ends(size);
    }
    test_point_to_point_numbers_are_checked();
  }
  for (int size : {3, 5}) test_silent_rank_is_named_not_its_neighbour(size);
  if (job_transport == TransportKind::kTcp) test_altered_frame_is_refused();  // a relay between sockets
  if (job_transport == TransportKind::kFake) {
    for (CostModel cost : {always_ring(), always_recursive_doubling()}) {
      for (int size : {2, 3, 4, 5}) test_failure_at_every_message(cost, size, size - 1, 1000);
      for (int size : {2, 3, 5}) test_silent_rank_named_at(cost, size, size / 2, 1000);
    }
  }
}

// Shared memory: rank 1 is a child process, holding its ends of the links as a real rank
// would, and is killed (SIGKILL) while rank 0 waits to receive from it. Rank 0 fails at once,
// naming it, long before its deadline.
void test_killed_shm_peer_is_named() {
  const std::vector<std::string> names{"rank 0", "rank 1"};
  ShmMesh mesh = shm_mesh(2, [](int) { return 0; }, /*by_reference=*/false);
  const pid_t child = fork();
  if (child == 0) {
    pause();  // until killed
    _exit(0);
  }
  const ShmLink& theirs = mesh.links[1][0];
  for (int fd : {mesh.doorbells[1], theirs.segment_fd, theirs.watch_fd, theirs.doorbell_fd}) ::close(fd);
  ShmTransport rank0(0, 2, mesh.doorbells[0], mesh.links[0], names);
  std::vector<char> buffer(100);
  FrameHeader expected;
  expected.nbytes = buffer.size();
  TransportRequest request = rank0.recv(1, expected, buffer.data());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto killed = std::chrono::steady_clock::now();
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  std::string error;
  try {
    rank0.wait(request, deadline_after(20));
  } catch (const CollectiveError& e) {
    error = e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  check(error.find("rank 1 closed the connection (process exited or was killed?)") != std::string::npos,
        "killed shm peer: rank 0 must name rank 1, said '" + error + "'");
  check(seconds < 2, "killed shm peer: seen after " + std::to_string(seconds) + " s");
}

// One part of the suite (ctest runs each as a test of its own, in parallel), or every part.
int main(int argc, char** argv) {
  const std::string part = argc > 1 ? argv[1] : "all";
  const std::vector<std::string> parts{"tcp-mac", "tcp-none", "tcp-aead", "shm", "routed", "fake", "board"};
  if (part != "all" && std::find(parts.begin(), parts.end(), part) == parts.end()) {
    std::fprintf(stderr, "usage: test_collectives [all|tcp-mac|tcp-none|tcp-aead|shm|routed|fake|board]\n");
    return 2;
  }
  auto runs = [&](const std::string& name) { return part == "all" || part == name; };
  if (runs("shm")) test_killed_shm_peer_is_named();  // forks: first, while this process has one thread
  for (WireSecurity security : {WireSecurity::kMac, WireSecurity::kNone, WireSecurity::kAead}) {
    if (!runs(std::string("tcp-") + to_string(security))) continue;
    job_security = security;
    std::printf("tcp, wire security %s\n", to_string(security));
    run_all();
  }
  job_security = WireSecurity::kMac;
  for (auto [kind, name] : {std::pair{TransportKind::kShm, "shm"}, std::pair{TransportKind::kRouted, "routed"},
                            std::pair{TransportKind::kFake, "fake"}}) {
    if (!runs(name)) continue;
    job_transport = kind;
    std::printf("%s transport\n", to_string(kind));
    run_all();
  }
  if (runs("board")) {
    std::printf("shared board\n");
    run_board();
  }
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_collectives %s: all checks passed\n", part.c_str());
  return 0;
}
