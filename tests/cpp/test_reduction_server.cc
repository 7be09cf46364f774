// The reduction server with workers and reducers as threads over loopback TCP: every result
// against a left fold over ranks, bit for bit, for several N, R and chunk sizes; reducers that
// stop or go silent mid-sequence; a reducer cut off from one worker only; no reducer left;
// workers that disagree; a worker that stops, named by every other. The host plan: sums in the
// host, then in host order, for several H, R and chunk sizes; a reducer that stops; the
// reducer's checks of the workers' groups.
#include <cmath>
#include <cstring>
#include <random>

#include "harness.h"
#include "kernels/reduce.h"
#include "transport/frame_io.h"

using namespace collectives;
using namespace collectives::testing;

namespace {

CommunicatorOptions reducer_options(size_t chunk_bytes, bool fallback_ring = false) {
  CommunicatorOptions options;
  options.timeout_seconds = 30;
  options.reduction_server = true;
  options.reduction_server_settings.chunk_bytes = chunk_bytes;
  options.reduction_server_settings.heartbeat_timeout = 1.0;
  options.reduction_server_settings.fallback_ring = fallback_ring;
  return options;
}

// Exponents from 2^-20 to 2^20: float sums of these depend on the order of the additions, so
// equal bits mean the same order.
std::vector<float> spread_floats(int rank, size_t count, unsigned seed) {
  std::mt19937 gen(seed * 7919 + rank);
  std::uniform_real_distribution<float> mantissa(-1, 1);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<float> v(count);
  for (auto& x : v) x = std::ldexp(mantissa(gen), exponent(gen));
  return v;
}

// inputs[round][rank]: spread_floats with seed first_seed + round.
std::vector<std::vector<std::vector<float>>> inputs_per_round(int rounds, int workers, size_t count, unsigned first_seed) {
  std::vector<std::vector<std::vector<float>>> inputs(rounds, std::vector<std::vector<float>>(workers));
  for (int round = 0; round < rounds; ++round) {
    for (int r = 0; r < workers; ++r) inputs[round][r] = spread_floats(r, count, first_seed + round);
  }
  return inputs;
}

// ((x0 + x1) + x2) + ... element by element, as numpy's left fold over ranks.
std::vector<float> left_fold(const std::vector<std::vector<float>>& data) {
  std::vector<float> sum = data[0];
  for (size_t r = 1; r < data.size(); ++r) {
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += data[r][i];
  }
  return sum;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string describe_job(int workers, int reducers, size_t chunk, size_t count) {
  return std::to_string(workers) + " workers, " + std::to_string(reducers) + " reducers, chunk " +
         std::to_string(chunk) + " B, count " + std::to_string(count);
}

void test_sum_is_left_fold(int workers, int reducers, size_t chunk, size_t count) {
  Job job(workers, reducers, reducer_options(chunk));
  const std::string what = describe_job(workers, reducers, chunk, count);
  for (unsigned seed = 0; seed < 3; ++seed) {
    std::vector<std::vector<float>> data(workers);
    for (int r = 0; r < workers; ++r) data[r] = spread_floats(r, count, seed);
    const auto expected = left_fold(data);
    auto errors = job.run([&](int r) {
      wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
    });
    for (int r = 0; r < workers; ++r) {
      check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
      check(same_bits(data[r], expected), what + ": rank " + std::to_string(r) +
                                              " differs from the left fold over ranks");
    }
  }
}

// float16 and bfloat16 contributions are summed in float32 and rounded once; avg divides
// that sum once.
void test_half_sums_in_float32(DataType dtype, ReduceOp op) {
  const int workers = 3;
  const size_t count = 5001;
  Job job(workers, 2, reducer_options(1024));
  std::vector<std::vector<uint16_t>> data(workers, std::vector<uint16_t>(count));
  std::vector<float> sum(count, 0), widened(count);
  for (int r = 0; r < workers; ++r) {
    auto values = spread_floats(r, count, 11);
    narrow(data[r].data(), values.data(), count, dtype);
    widen(widened.data(), data[r].data(), count, dtype);
    for (size_t i = 0; i < count; ++i) sum[i] = r == 0 ? widened[i] : sum[i] + widened[i];
  }
  if (op == ReduceOp::kAvg) {
    for (auto& x : sum) x /= workers;
  }
  std::vector<uint16_t> expected(count);
  narrow(expected.data(), sum.data(), count, dtype);
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allreduce(data[r].data(), count, dtype, op));
  });
  const std::string what = std::string(to_string(dtype)) + " " + to_string(op);
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
    check(data[r] == expected, what + ": not the float32 sum rounded once on rank " +
                                   std::to_string(r));
  }
}

void test_integers_and_avg() {
  const int workers = 4;
  const size_t count = 777;
  Job job(workers, 3, reducer_options(256));
  std::vector<std::vector<int32_t>> ints(workers, std::vector<int32_t>(count));
  std::vector<std::vector<double>> doubles(workers, std::vector<double>(count));
  std::vector<int32_t> int_sum(count, 0);
  std::vector<double> avg(count, 0);
  for (int r = 0; r < workers; ++r) {
    for (size_t i = 0; i < count; ++i) {
      ints[r][i] = static_cast<int32_t>(i * 31 + r * 1000003);
      doubles[r][i] = 0.1 * static_cast<double>(i) + r;
      int_sum[i] += ints[r][i];
      avg[i] += doubles[r][i];
    }
  }
  for (auto& x : avg) x /= workers;
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allreduce(ints[r].data(), count, DataType::kInt32, ReduceOp::kSum));
    wait(job.comms[r]->allreduce(doubles[r].data(), count, DataType::kFloat64, ReduceOp::kAvg));
  });
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), "int32 sum, float64 avg: rank " + std::to_string(r) + " raised " +
                                 errors[r]);
    check(ints[r] == int_sum, "int32 sum wrong on rank " + std::to_string(r));
    check(doubles[r] == avg, "float64 avg wrong on rank " + std::to_string(r));
  }
}

// A long sequence of all-reduces while a reducer fails: every result is still right, and the
// workers stop using the failed reducer. `silent`: it hangs (no heartbeat) instead of closing.
void test_reducer_fails_midway(bool silent) {
  const int workers = 3, reducers = 3, rounds = 30;
  const size_t count = 300000;
  Job job(workers, reducers, reducer_options(64 << 10), 1, {}, silent ? 1 : 0);
  std::vector<std::vector<float>> data(workers);
  std::thread stopper;
  if (!silent) {
    stopper = std::thread([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
      job.reducers[1]->stop();
    });
  }
  const auto inputs = inputs_per_round(rounds, workers, count, 100);
  std::vector<int> wrong(workers, 0);
  auto errors = job.run([&](int r) {
    for (int round = 0; round < rounds; ++round) {
      std::vector<float> x = inputs[round][r];
      wait(job.comms[r]->allreduce(x.data(), count, DataType::kFloat32, ReduceOp::kSum));
      if (!same_bits(x, left_fold(inputs[round]))) ++wrong[r];
    }
  });
  if (stopper.joinable()) stopper.join();
  const int failed = silent ? reducers - 1 : 1;
  const std::string what = silent ? "a silent reducer" : "a reducer stopped midway";
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
    check(wrong[r] == 0, what + ": " + std::to_string(wrong[r]) + " wrong results on rank " +
                             std::to_string(r));
    auto stats = job.comms[r]->reducer_stats();
    check(!stats[failed].alive, what + ": rank " + std::to_string(r) + " still uses it");
  }
}

// Back-to-back async all-reduces, as DDP issues one per bucket: the next one's chunks go out
// while the one before finishes; a reducer that stops meanwhile costs nothing but time.
void test_many_in_flight(bool stop_one) {
  const int workers = 3, reducers = 3, rounds = 24;
  const size_t count = 100000;
  Job job(workers, reducers, reducer_options(32 << 10));
  std::vector<std::vector<std::vector<float>>> inputs(rounds, std::vector<std::vector<float>>(workers));
  for (int round = 0; round < rounds; ++round) {
    for (int r = 0; r < workers; ++r) inputs[round][r] = spread_floats(r, count, 500 + round);
  }
  std::thread stopper;
  if (stop_one) {
    stopper = std::thread([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      job.reducers[0]->stop();
    });
  }
  std::vector<int> wrong(workers, 0);
  auto errors = job.run([&](int r) {
    std::vector<std::vector<float>> x(rounds);
    std::vector<std::shared_ptr<Work>> works;
    for (int round = 0; round < rounds; ++round) {
      x[round] = inputs[round][r];
      works.push_back(job.comms[r]->allreduce(x[round].data(), count, DataType::kFloat32, ReduceOp::kSum));
    }
    for (int round = 0; round < rounds; ++round) {
      wait(works[round]);
      if (!same_bits(x[round], left_fold(inputs[round]))) ++wrong[r];
    }
  });
  if (stopper.joinable()) stopper.join();
  const std::string what = std::string("many in flight") + (stop_one ? ", a reducer stopped" : "");
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
    check(wrong[r] == 0, what + ": " + std::to_string(wrong[r]) + " wrong results on rank " +
                             std::to_string(r));
  }
}

// An all-reduce queued behind another on the same buffer must wait for its sums before its
// own chunks go out (it is not posted ahead).
void test_same_buffer_twice() {
  const int workers = 3;
  const size_t count = 1000;  // one chunk per reducer: the second would go out at once
  Job job(workers, 2, reducer_options(4096));
  std::vector<std::vector<float>> data(workers);
  for (int r = 0; r < workers; ++r) data[r] = std::vector<float>(count, static_cast<float>(r + 1));
  auto errors = job.run([&](int r) {
    auto first = job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum);
    auto second = job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum);
    wait(first);
    wait(second);
  });
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), "same buffer twice: rank " + std::to_string(r) + " raised " + errors[r]);
    check(data[r] == std::vector<float>(count, 18.0f), "same buffer twice: wrong sum on rank " +
                                                           std::to_string(r) + " (want 3 x 6)");
  }
}

// A failure with several all-reduces queued (some posted ahead, some not): each fails with
// CollectiveError, none crashes or hangs.
void test_failure_with_reductions_queued() {
  const int workers = 2, queued = 5;
  const size_t count = 200000;
  Job job(workers, 2, reducer_options(4096));
  std::vector<std::vector<std::vector<float>>> data(workers, std::vector<std::vector<float>>(queued));
  auto errors = job.run([&](int r) {
    std::vector<std::shared_ptr<Work>> works;
    for (int i = 0; i < queued; ++i) {
      data[r][i].assign(count, 1.0f);
      works.push_back(job.comms[r]->allreduce(data[r][i].data(), count, DataType::kFloat32, ReduceOp::kSum));
    }
    if (r == 1) job.comms[r]->abort("rank 1 gives up");
    int failed = 0;
    for (auto& work : works) {
      try {
        wait(work);
      } catch (const CollectiveError&) {
        ++failed;
      }
    }
    if (failed == 0) throw std::runtime_error("no all-reduce failed");
  });
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), "failure with reductions queued: rank " + std::to_string(r) + ": " + errors[r]);
  }
}

// Reads the next whole frame from a blocking socket, its payload into `payload`; false if the
// connection ended or the frame is not authentic.
bool read_frame(int fd, FrameReader& reader, std::vector<char>& payload) {
  for (;;) {
    ssize_t got = ::recv(fd, reader.next(), reader.wanted(UINT64_MAX), 0);
    if (got <= 0) return false;
    switch (reader.advance(static_cast<size_t>(got))) {
      case FrameReader::Event::kNone:
        continue;
      case FrameReader::Event::kHeader:
        payload.resize(reader.header().nbytes);
        if (!reader.read_payload_into(payload.data())) continue;
        break;
      case FrameReader::Event::kFrame:
        break;
    }
    const bool ok = reader.authentic();
    reader.next_frame();
    return ok;
  }
}

// A reducer that dies having answered one worker and not the others: it sums the first chunk
// it gets and sends the sum to worker 0 only, then ends every connection. The workers must
// take that chunk from worker 0 (not from another reducer, and never as a wrong sum).
void test_reducer_dies_after_answering_one_worker() {
  const int workers = 3;
  const size_t count = 40000;
  Job job(workers, 2, reducer_options(16 << 10), 1, {}, 1);
  std::thread script([&] {
    std::vector<FrameHeader> headers(workers);
    std::vector<std::vector<float>> parts(workers);
    std::vector<char> payload;
    for (int w = 0; w < workers; ++w) {
      FrameReader reader(receiving_protection(job.silent_links[w]));
      if (!read_frame(job.silent_links[w].fd, reader, payload)) return;
      headers[w] = reader.header();
      parts[w].resize(payload.size() / sizeof(float));
      std::memcpy(parts[w].data(), payload.data(), payload.size());
    }
    const auto sum = left_fold(parts);
    FrameWriter writer(sending_protection(job.silent_links[0]));
    const std::string bytes(reinterpret_cast<const char*>(sum.data()), headers[0].nbytes);
    write_frame(job.silent_links[0].fd, writer, headers[0], bytes, deadline_after(10));
    for (const Link& link : job.silent_links) ::shutdown(link.fd, SHUT_WR);
    char sink[4096];
    for (const Link& link : job.silent_links) {
      while (::recv(link.fd, sink, sizeof(sink), 0) > 0) {
      }
    }
  });
  std::vector<std::vector<float>> data(workers);
  for (int r = 0; r < workers; ++r) data[r] = spread_floats(r, count, 77);
  const auto expected = left_fold(data);
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
  });
  script.join();
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), "answered one worker: rank " + std::to_string(r) + " raised " + errors[r]);
    check(same_bits(data[r], expected), "answered one worker: wrong sum on rank " + std::to_string(r));
  }
}

// A worker's chunk sealed with a key that is not the connection's (as from an attacker who
// relays the connection): the reducer refuses it before it joins a sum, stops the job and
// tells the worker why.
void test_reducer_refuses_a_forged_chunk() {
  auto [at_reducer, at_worker] = loopback_link();
  std::string reducer_error;
  std::thread serving([&, link = at_reducer] {
    try {
      ReductionServer server({link}, {"rank 0"}, {});
      server.serve();
    } catch (const std::exception& e) {
      reducer_error = e.what();
    }
  });
  FrameWriter forger(FrameProtection(job_security, random_key()));
  std::vector<float> chunk(256, 1.0f);
  CollectiveTag tag{CollectiveKind::kAllreduce, 0, chunk.size(), DataType::kFloat32, ReduceOp::kSum};
  const std::string bytes(reinterpret_cast<const char*>(chunk.data()), chunk.size() * sizeof(float));
  write_frame(at_worker.fd, forger, tag.header(0, bytes.size()), bytes, deadline_after(10));
  FrameReader reader(receiving_protection(at_worker));
  std::vector<char> notice;
  const bool got_notice = read_frame(at_worker.fd, reader, notice);
  serving.join();
  ::close(at_worker.fd);
  check(reducer_error.find("failed its integrity check") != std::string::npos,
        "forged chunk: the reducer must refuse it, said '" + reducer_error + "'");
  check(got_notice && reader.header().kind == static_cast<uint8_t>(FrameKind::kAbort) &&
            std::string(notice.begin(), notice.end()).find("integrity") != std::string::npos,
        "forged chunk: the worker must hear why");
}

// The link between worker 1 and reducer 0 is cut (nothing arrives, nothing ends) while
// reducer 0 stays alive for the others: worker 1 drops it at its heartbeat deadline and tells
// the others, who drop it too, long before the collective's deadline; every result is exact
// and the reducer that everyone left does not fail the job.
void test_reducer_cut_off_from_one_worker() {
  const int workers = 3, reducers = 2, rounds = 20;
  const size_t count = 100000;
  CommunicatorOptions options = reducer_options(16 << 10);
  Job job(workers, reducers, options, 1, {}, 0, {1, 0});
  std::vector<std::vector<std::vector<float>>> inputs(rounds, std::vector<std::vector<float>>(workers));
  for (int round = 0; round < rounds; ++round) {
    for (int r = 0; r < workers; ++r) inputs[round][r] = spread_floats(r, count, 900 + round);
  }
  std::vector<int> wrong(workers, 0);
  const auto started = Clock::now();
  auto errors = job.run([&](int r) {
    for (int round = 0; round < rounds; ++round) {
      if (r == 1 && round == 3) job.relay->cut();
      std::vector<float> x = inputs[round][r];
      wait(job.comms[r]->allreduce(x.data(), count, DataType::kFloat32, ReduceOp::kSum));
      if (!same_bits(x, left_fold(inputs[round]))) ++wrong[r];
    }
  });
  const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
  for (int r = 0; r < workers; ++r) {
    const std::string rank = "cut off from one worker: rank " + std::to_string(r);
    check(errors[r].empty(), rank + " raised " + errors[r]);
    check(wrong[r] == 0, rank + ": " + std::to_string(wrong[r]) + " wrong results");
    auto stats = job.comms[r]->reducer_stats();
    check(!stats[0].alive && stats[1].alive, rank + " must have dropped reducer 0 only");
  }
  check(seconds < options.timeout_seconds / 3,
        "cut off from one worker: took " + std::to_string(seconds) + " s, as if waiting for the deadline");
  job.finish();  // the job ends well: goodbyes to the reducer still in use
  check(job.reducer_errors[1].empty(), "cut off from one worker: reducer 1 raised " + job.reducer_errors[1]);
  check(job.reducer_errors[0].find("stopped using this reducer") != std::string::npos,
        "cut off from one worker: reducer 0 must say that the workers left it, said '" +
            job.reducer_errors[0] + "'");
}

// Worker 2 stops calling collectives (as a stopped process would) while the others all-reduce:
// each of them times out naming worker 2, whose chunk the reducers wait for, and the reducers
// say that worker 0 or 1 gave up, not that it died.
void test_stopped_worker_is_named_everywhere() {
  const int workers = 3;
  CommunicatorOptions options = reducer_options(4096);
  options.timeout_seconds = 2;
  options.reduction_server_settings.heartbeat_timeout = 1;
  Job job(workers, 2, options);
  std::vector<std::vector<float>> data(workers, std::vector<float>(10000, 1.0f));
  auto errors = job.run([&](int r) {
    if (r == 2) return;
    wait(job.comms[r]->allreduce(data[r].data(), data[r].size(), DataType::kFloat32, ReduceOp::kSum));
  });
  for (int r = 0; r < 2; ++r) {
    check(errors[r].find("of allreduce #0 (sum, 10000 x float32) from rank 2") != std::string::npos &&
              errors[r].find("died") == std::string::npos,
          "stopped worker: rank " + std::to_string(r) + " must name rank 2, said '" + errors[r] + "'");
  }
  job.finish();
  for (const std::string& error : job.reducer_errors) {
    check(error.find("aborted the job: ") != std::string::npos && error.find("from rank 2") != std::string::npos &&
              error.find("died") == std::string::npos,
          "stopped worker: a reducer must relay why a worker gave up, said '" + error + "'");
  }
}

void test_no_reducer_left(bool fallback_ring) {
  const int workers = 3;
  const size_t count = 10000;
  Job job(workers, 2, reducer_options(4096, fallback_ring));
  for (auto& reducer : job.reducers) reducer->stop();
  std::vector<std::vector<float>> data(workers);
  for (int r = 0; r < workers; ++r) data[r] = std::vector<float>(count, static_cast<float>(r + 1));
  auto errors = job.run([&](int r) {
    wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
  });
  for (int r = 0; r < workers; ++r) {
    if (fallback_ring) {
      check(errors[r].empty(), "ring fallback: rank " + std::to_string(r) + " raised " + errors[r]);
      check(data[r] == std::vector<float>(count, 6.0f), "ring fallback: wrong sum");
    } else {
      check(errors[r].find("reducers failed") != std::string::npos,
            "no reducer left: rank " + std::to_string(r) + " raised '" + errors[r] +
                "', expected a CollectiveError naming the failed reducers");
    }
  }
}

void test_disagreeing_workers_fail_everywhere() {
  const int workers = 3;
  Job job(workers, 2, reducer_options(1024));
  std::vector<std::vector<float>> data(workers, std::vector<float>(4000, 1.0f));
  auto errors = job.run([&](int r) {
    const size_t count = r == 1 ? 3000 : 4000;
    wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
  });
  for (int r = 0; r < workers; ++r) {
    check(errors[r].find("workers disagree") != std::string::npos,
          "disagreeing counts: rank " + std::to_string(r) + " raised '" + errors[r] +
              "', expected the reducer's message that workers disagree");
  }
}

// The host plan over `hosts` hosts of 2 ranks (ranks 2h and 2h + 1 on host h): each element is
// x_2h + x_2h+1 inside the host (two ranks: either order gives the same bits), then the hosts'
// sums folded left in host order; avg divides that once by the number of workers. The same bits
// for every number of reducers and chunk size, as the flat plan's are.
CommunicatorOptions host_plan_options(int hosts, size_t chunk_bytes) {
  CommunicatorOptions options = reducer_options(chunk_bytes);
  for (int h = 0; h < hosts; ++h) options.reduction_server_settings.hosts.push_back({2 * h, 2 * h + 1});
  return options;
}

std::vector<float> host_fold(const std::vector<std::vector<float>>& data) {
  std::vector<std::vector<float>> host_sums;
  for (size_t h = 0; 2 * h < data.size(); ++h) host_sums.push_back(left_fold({data[2 * h], data[2 * h + 1]}));
  return left_fold(host_sums);
}

void test_host_plan_sums_in_host_then_host_order(int hosts, int reducers, size_t chunk, size_t count) {
  const int workers = 2 * hosts;
  Job job(workers, reducers, host_plan_options(hosts, chunk));
  const std::string what = "host plan, " + describe_job(workers, reducers, chunk, count);
  for (unsigned seed = 0; seed < 2; ++seed) {
    std::vector<std::vector<float>> data(workers);
    for (int r = 0; r < workers; ++r) data[r] = spread_floats(r, count, seed);
    const auto expected = host_fold(data);
    std::vector<std::vector<float>> averaged = data;
    auto expected_avg = expected;
    for (auto& x : expected_avg) x /= workers;
    auto errors = job.run([&](int r) {
      wait(job.comms[r]->allreduce(data[r].data(), count, DataType::kFloat32, ReduceOp::kSum));
      wait(job.comms[r]->allreduce(averaged[r].data(), count, DataType::kFloat32, ReduceOp::kAvg));
    });
    for (int r = 0; r < workers; ++r) {
      check(errors[r].empty(), what + ": rank " + std::to_string(r) + " raised " + errors[r]);
      check(same_bits(data[r], expected), what + ": rank " + std::to_string(r) +
                                              " differs from the host sums folded in host order");
      check(same_bits(averaged[r], expected_avg), what + ": avg on rank " + std::to_string(r) +
                                                      " is not that sum divided once by the workers");
    }
  }
}

// A reducer stopped in the middle of a sequence under the host plan: its chunks move to the
// others, within each group, and every result stays exact.
void test_host_plan_survives_a_stopped_reducer() {
  const int hosts = 3, workers = 2 * hosts, reducers = 3, rounds = 20;
  const size_t count = 300000;
  Job job(workers, reducers, host_plan_options(hosts, 32 << 10));
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    job.reducers[1]->stop();
  });
  const auto inputs = inputs_per_round(rounds, workers, count, 300);
  std::vector<int> wrong(workers, 0);
  auto errors = job.run([&](int r) {
    for (int round = 0; round < rounds; ++round) {
      std::vector<float> x = inputs[round][r];
      wait(job.comms[r]->allreduce(x.data(), count, DataType::kFloat32, ReduceOp::kSum));
      if (!same_bits(x, host_fold(inputs[round]))) ++wrong[r];
    }
  });
  stopper.join();
  for (int r = 0; r < workers; ++r) {
    check(errors[r].empty(), "host plan, a reducer stopped: rank " + std::to_string(r) + " raised " + errors[r]);
    check(wrong[r] == 0, "host plan, a reducer stopped: " + std::to_string(wrong[r]) + " wrong results on rank " +
                             std::to_string(r));
    check(!job.comms[r]->reducer_stats()[1].alive, "host plan: rank " + std::to_string(r) + " still uses it");
  }
}

// The reducer's side of the groups, with two workers written by hand: a worker whose list of
// groups differs from the first one's, and a chunk for another group than the sender's, stop
// the job with the reason, told to the workers.
void test_reducer_checks_the_groups(bool disagree) {
  auto [reducer0, worker0] = loopback_link();
  auto [reducer1, worker1] = loopback_link();
  std::string reducer_error;
  std::thread serving([&, a = reducer0, b = reducer1] {
    try {
      ReductionServer server({a, b}, {"rank 0", "rank 1"}, {});
      server.serve();
    } catch (const std::exception& e) {
      reducer_error = e.what();
    }
  });
  auto groups_frame = [](uint32_t g0, uint32_t g1) {
    std::string payload(8, '\0');
    payload[0] = static_cast<char>(g0);
    payload[4] = static_cast<char>(g1);
    FrameHeader header;
    header.kind = static_cast<uint8_t>(FrameKind::kGroups);
    header.nbytes = payload.size();
    return std::make_pair(header, payload);
  };
  FrameWriter writer0(sending_protection(worker0)), writer1(sending_protection(worker1));
  const auto [h0, p0] = groups_frame(0, 1);
  write_frame(worker0.fd, writer0, h0, p0, deadline_after(10));
  if (disagree) {
    const auto [h1, p1] = groups_frame(0, 0);
    write_frame(worker1.fd, writer1, h1, p1, deadline_after(10));
  } else {
    write_frame(worker1.fd, writer1, h0, p0, deadline_after(10));
    std::vector<float> chunk(64, 1.0f);
    CollectiveTag tag{CollectiveKind::kAllreduce, 0, chunk.size(), DataType::kFloat32, ReduceOp::kSum};
    FrameHeader header = tag.header(0, chunk.size() * sizeof(float));
    header.root = 0;  // rank 1 is in group 1
    write_frame(worker1.fd, writer1, header, std::string(reinterpret_cast<const char*>(chunk.data()), header.nbytes),
                deadline_after(10));
  }
  FrameReader reader(receiving_protection(worker0));
  std::vector<char> notice;
  const bool got_notice = read_frame(worker0.fd, reader, notice);
  serving.join();
  ::close(worker0.fd);
  ::close(worker1.fd);
  const std::string expected = disagree ? "groups the workers otherwise" : "belongs to group 1";
  check(reducer_error.find(expected) != std::string::npos,
        "groups: the reducer must stop the job with '" + expected + "', said '" + reducer_error + "'");
  check(got_notice && reader.header().kind == static_cast<uint8_t>(FrameKind::kAbort) &&
            std::string(notice.begin(), notice.end()).find(expected) != std::string::npos,
        "groups: the workers must hear why");
}

}  // namespace

int main() {
  // Everything under the default wire security; the data paths again under the others.
  job_security = WireSecurity::kMac;
  for (int workers : {1, 2, 3, 4}) {
    for (int reducers : {1, 2, 3, 5}) {
      test_sum_is_left_fold(workers, reducers, 4096, 1);
      test_sum_is_left_fold(workers, reducers, 4096, 10007);
    }
  }
  for (size_t chunk : {size_t(4), size_t(1000), size_t(1) << 20}) test_sum_is_left_fold(3, 2, chunk, 54321);
  test_half_sums_in_float32(DataType::kFloat16, ReduceOp::kSum);
  test_half_sums_in_float32(DataType::kBFloat16, ReduceOp::kSum);
  test_half_sums_in_float32(DataType::kBFloat16, ReduceOp::kAvg);
  test_integers_and_avg();
  test_reducer_fails_midway(false);
  test_reducer_fails_midway(true);
  test_reducer_dies_after_answering_one_worker();
  test_many_in_flight(false);
  test_same_buffer_twice();
  test_failure_with_reductions_queued();
  test_many_in_flight(true);
  test_no_reducer_left(false);
  test_no_reducer_left(true);
  test_disagreeing_workers_fail_everywhere();
  test_reducer_cut_off_from_one_worker();
  test_stopped_worker_is_named_everywhere();
  test_reducer_refuses_a_forged_chunk();
  for (int hosts : {2, 3}) {
    for (int reducers : {1, 2, 3}) test_host_plan_sums_in_host_then_host_order(hosts, reducers, 4096, 100003);
  }
  for (size_t chunk : {size_t(4), size_t(1) << 20}) test_host_plan_sums_in_host_then_host_order(2, 2, chunk, 54321);
  test_host_plan_sums_in_host_then_host_order(3, 2, 0, 1);
  test_host_plan_sums_in_host_then_host_order(2, 3, 0, 3 << 20);  // three pieces
  test_host_plan_survives_a_stopped_reducer();
  test_reducer_checks_the_groups(true);
  test_reducer_checks_the_groups(false);
  for (WireSecurity security : {WireSecurity::kNone, WireSecurity::kAead}) {
    job_security = security;
    test_sum_is_left_fold(3, 2, 4096, 10007);
    test_half_sums_in_float32(DataType::kBFloat16, ReduceOp::kAvg);
    test_reducer_fails_midway(true);
    test_reducer_dies_after_answering_one_worker();
    test_many_in_flight(true);
    test_reducer_cut_off_from_one_worker();
  }
  job_security = WireSecurity::kAead;
  test_reducer_refuses_a_forged_chunk();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all reduction server tests passed\n");
  return 0;
}
