// All-reduce through the reducers (reduction_server.cc): each worker sends every chunk of its
// buffer once, to the reducer that owns it, and receives the chunk's sum once. The object owns
// the worker's channels to the reducers and what the calls share: which reducers each finished
// call ended with, so that the next calls can be posted ahead over the same reducers on every
// worker.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/allreduce.h"
#include "reduction_server/client.h"
#include "transport/socket.h"

namespace collectives {

struct ReductionServerSettings {
  size_t chunk_bytes = 0;  // 0: the default (reduction_server.cc)
  int inflight = 0;        // unanswered chunks per reducer; 0: the default
  double heartbeat_timeout = 10;
  bool fallback_ring = false;  // with every reducer gone, finish on the ring instead of failing
};

class ReductionServerAllreduce : public AllreduceAlgorithm {
 public:
  // links[r]: the connected, authenticated socket to reducer r (owned from here on). `rank`
  // names this worker in what it logs.
  ReductionServerAllreduce(std::vector<Link> links, std::vector<std::string> names,
                           const ReductionServerSettings& settings, int rank);

  const char* name() const override { return "reduction_server"; }
  bool waits_through_context() const override { return false; }  // it waits on the reducers' channels
  std::unique_ptr<AllreduceCall> call(const CollectiveTag& tag, void* data) override;

  // From any thread: a running or later call fails with CollectiveError(reason).
  void cancel(const std::string& reason) { channels_.cancel(reason); }
  // No buffer is touched after it; the reducers hear goodbye (`failure` empty) or why this
  // worker failed, which they relay to the other workers. Idempotent.
  void close(const std::string& failure) { channels_.close(failure); }
  std::vector<ReducerStat> stats() const { return channels_.stats(); }

 private:
  class Call;
  const ReductionServerSettings settings_;
  ReducerChannels channels_;
  // Guarded by the communicator's lock (AllreduceCall's contract):
  int64_t calls_ = 0;     // calls made; a call's number is its place among them
  int64_t finished_ = 0;  // calls 0..finished_-1 have succeeded
  std::map<int64_t, std::vector<int>> views_;  // reducers every worker still uses after call i
};

}  // namespace collectives
