// All-reduce through the reducers (reduction_server.cc). The object owns the worker's
// channels to the reducers and what the calls share: which reducers each finished call ended
// with, so that the next calls can be posted ahead over the same reducers on every worker.
//
// Two plans:
//  * flat ("reduction_server"): each worker sends every chunk of its buffer once, to the
//    reducer that owns it, and receives the chunk's sum once: S out and S in per worker.
//  * host ("reduction_server:host"), where every host holds the same number K >= 2 of ranks
//    and there are several hosts: the host's ranks reduce-scatter the buffer over shared memory
//    (the hierarchical plan's host ring, ring.h), local rank j exchanges only its 1/K of the
//    buffer with the reducers, and the host's ranks all-gather the sums: each host's NIC moves
//    S each way (K ranks times S/K), where the flat plan moves K·S and the hierarchical ring
//    2(H-1)/H·S. The reducers sum chunk (seq, j, unit) over the j-th ranks of the hosts
//    (reduction_server/server.h: each worker's group, told at connect).
//
// Deterministic: the same bits on every run, whatever the number of reducers and the chunk
// sizes. Flat plan: each element is the left fold over worker ranks (float16/bfloat16 summed in
// float32 and rounded once). Host plan: each element is first summed inside its host in the
// order the plan fixes (the ring order of the hierarchical plan's host reduce-scatter, in the
// buffer's dtype, over the pieces that the count and the dtype alone fix: Hierarchy::pieces),
// then the hosts' sums are folded left in host order (hosts ordered by their lowest rank) at
// the reducer, float16/bfloat16 in float32 and rounded once; avg divides once, at the reducer,
// by the number of workers. The two plans agree bit for bit only where the grouping cannot
// matter (integers): (a + b) + (c + d) need not equal ((a + b) + c) + d in floating point.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/allreduce.h"
#include "algorithms/hierarchy.h"
#include "reduction_server/client.h"
#include "transport/socket.h"

namespace collectives {

struct ReductionServerSettings {
  size_t chunk_bytes = 0;  // 0: the default (reduction_server.cc)
  int inflight = 0;        // unanswered chunks per reducer; 0: the default
  double heartbeat_timeout = 10;
  bool fallback_ring = false;  // with every reducer gone, finish on the ring instead of failing
  bool ucx = false;            // the frames go over UCX streams (the links carry their addresses)
  // The host plan's hosts, each its ranks in order (every host the same number, at least 2, of
  // at least 2 hosts); empty: the flat plan.
  std::vector<std::vector<int>> hosts;
};

class ReductionServerAllreduce : public AllreduceAlgorithm {
 public:
  // links[r]: the connected, authenticated socket to reducer r (owned from here on). `group`:
  // the communicator's (the world). std::invalid_argument where settings.hosts break its rules.
  ReductionServerAllreduce(std::vector<Link> links, std::vector<std::string> names,
                           const ReductionServerSettings& settings, const Group& group);

  const char* name() const override { return host_ ? "reduction_server:host" : "reduction_server"; }
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
  // The host plan: this rank's host (its ranks in order: the rings over shared memory), its
  // place there (its group at the reducers), and the ranks of that place on every host, in host
  // order (the group that shares its chunks). Null: the flat plan.
  struct HostPlan {
    Group host;
    int position;
    Group across;
  };
  static std::unique_ptr<HostPlan> make_host_plan(const Group& group, const std::vector<std::vector<int>>& hosts,
                                                  std::vector<uint32_t>* groups);

  const ReductionServerSettings settings_;
  std::vector<uint32_t> groups_;  // every worker's group at the reducers (host plan only)
  std::unique_ptr<HostPlan> host_;
  ReducerChannels channels_;
  // Guarded by the communicator's lock (AllreduceCall's contract):
  int64_t calls_ = 0;     // calls made; a call's number is its place among them
  int64_t finished_ = 0;  // calls 0..finished_-1 have succeeded
  std::map<int64_t, std::vector<int>> views_;  // reducers every worker still uses after call i
};

}  // namespace collectives
