// The reducer: a CPU process that sums all-reduce chunks for the N workers of one job.
//
// Protocol (each worker has one authenticated connection to each reducer):
//  - UCX. A worker whose job runs over UCX first sends a kUcxAddress frame: its UCX worker's
//    address. The reducer answers with its own, and from then on that worker's frames (all
//    those below, protected and counted on as before) go over a UCX stream between the two
//    addresses instead of the link (transport/ucx/ucx_stream.h); the link stays open, idle.
//  - Groups. The workers fall into contributing groups: by default one group of all N (the
//    flat plan: every worker sends its whole buffer). Under the host plan
//    (algorithms/reduction_server.h) each worker first sends a kGroups frame: N little-endian
//    uint32, the group of each worker (its index among its host's ranks), the same from every
//    worker; a worker that sends another list, or data without a list where the others sent
//    one, stops the job.
//  - A worker sends a chunk of its buffer as a kData frame: the all-reduce's sequence number,
//    dtype, op and element count, `root` = its group and `unit` = the chunk's index among the
//    group's chunks. A chunk for another group than the sender's stops the job.
//  - Once every member of group g has sent chunk (seq, g, unit), the reducer sums the members'
//    contributions in worker-rank order (float16/bfloat16 in float32, rounded once; avg
//    divided once by N, the job's workers, whatever the group) and sends the sum to every
//    member as a kData frame with the same header.
//  - While a worker has chunks here that are not yet answered, the reducer sends it a
//    kHeartbeat frame every heartbeat interval, so that the worker can tell a silent reducer
//    (dead, or its link cut) from a slow job. It says which workers' contributions the oldest
//    chunk still lacks, and since when (heartbeat.h): a worker that times out names them.
//  - kAbort from a worker: it failed, for the reason it gives. The reducer relays "rank k
//    aborted the job: <reason>" to every worker (below), never taking it for dead.
//  - kGoodbye from a worker: it will send nothing more. When every worker has said goodbye
//    and closed, serve() returns. A goodbye while chunks are still pending, or chunks after a
//    goodbye, mean that the workers stopped using this reducer (they took it for dead): the
//    reducer closes every connection, so that workers still waiting on it re-shard at once.
//  - A worker whose connection ends without goodbye has died, and a frame that breaks the
//    protocol or disagrees with another worker's for the same chunk is a bug or a mismatch:
//    either way the job cannot go on, so the reducer sends kAbort with the reason to every
//    worker and serve() throws CollectiveError.
// Reducers keep no state between chunks, so a worker can send a chunk to any reducer: that
// is how workers move the chunks of a dead reducer onto the others.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/file_descriptor.h"
#include "transport/wire_security.h"

namespace collectives {

struct ReducerOptions {
  int threads = 0;                          // summing threads; 0: up to 4, one per core
  // Chunks held at once, all workers together; 0: 128 MiB per worker.
  size_t max_memory_bytes = 0;
  double heartbeat_interval_seconds = 0.25;
  bool debug = false;  // log each chunk on stderr
  // The libucp to load if a worker asks for UCX (a kUcxAddress frame); empty: none is.
  std::string ucx_library;
};

struct ReducerStats {
  uint64_t bytes_received = 0;
  uint64_t bytes_sent = 0;
  uint64_t chunks_reduced = 0;
  uint64_t elements_reduced = 0;
  int workers_connected = 0;
  int workers_over_ucx = 0;  // workers whose frames come and go over UCX, not their TCP links
};

class ReductionServer {
 public:
  // worker_links[k]: the connected, authenticated socket of worker k (the server owns them).
  ReductionServer(std::vector<Link> worker_links, std::vector<std::string> worker_names,
                  ReducerOptions options);
  ~ReductionServer();
  ReductionServer(const ReductionServer&) = delete;
  ReductionServer& operator=(const ReductionServer&) = delete;

  // Serves the job until every worker has said goodbye (returns) or it fails (throws
  // CollectiveError after telling the workers why). Call once.
  void serve();
  // From any thread: serve() closes every connection and returns soon. The workers take
  // this reducer for dead and move its chunks to the others.
  void stop();
  ReducerStats stats() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace collectives
