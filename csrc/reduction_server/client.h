// A worker's connections to the job's reducers (protocol in reduction_server/server.h).
//
// A progress thread sends chunks of the workers' buffers to reducers and receives their sums
// into the same place; chunks of several all-reduces can be in flight at once (post() them
// in order, wait() for each). Unlike the ring's transport, where any failure ends the job, a
// reducer that fails only loses its chunks: its connection ended, or it sent nothing (no
// sum, no heartbeat) for heartbeat_timeout while it owed us sums. The caller moves those
// chunks elsewhere. A sum is received into staging memory and copied into the buffer only
// once complete, so a reducer that dies mid-frame leaves the worker's contribution intact
// for the next reducer.
//
// A worker's failure reaches the reducers as an abort notice with its reason (close()), which
// they relay to the other workers: a worker that gave up is never taken for one that died.
// Heartbeats say which workers a reducer still waits for, so that a worker that times out
// names them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/file_descriptor.h"
#include "reduction_server/heartbeat.h"
#include "transport/byte_stream.h"
#include "transport/frame.h"
#include "transport/frame_io.h"
#include "transport/socket.h"
#include "transport/wire_security.h"

namespace collectives {

struct ShardTransfer {
  enum class State { kQueued, kDone, kLost };
  int reducer = 0;
  FrameHeader header;    // unit = chunk index, nbytes = chunk bytes
  char* data = nullptr;  // the chunk: sent from here, the sum received into here
  State state = State::kQueued;
};

// The transfers of one all-reduce; their states are final once wait() returned.
struct ShardBatch {
  std::vector<ShardTransfer> transfers;
  size_t unfinished = 0;  // guarded by the channels' mutex
};
using ShardBatchHandle = std::shared_ptr<ShardBatch>;

struct ReducerStat {
  std::string name;
  bool alive;
  uint64_t bytes_sent;
  uint64_t bytes_received;
  std::string transport;  // what the frames go over: "tcp" or "ucx"
};

class ReducerChannels {
 public:
  // links[r]: the connected, authenticated socket to reducer r (owned from here on). At most
  // `inflight` chunks per reducer are unanswered at a time. `log` tells the user of a
  // reducer's failure (called from the progress thread). `groups`, where not empty: every
  // worker's contributing group, told each reducer first (a kGroups frame, server.h). `ucx`:
  // the frames go over UCX streams, whose addresses the links carry first (server.h); UCX
  // must be loaded (load_ucx).
  ReducerChannels(std::vector<Link> links, std::vector<std::string> names, int inflight,
                  double heartbeat_timeout, std::function<void(const std::string&)> log,
                  const std::vector<uint32_t>& groups = {}, bool ucx = false);
  ~ReducerChannels();
  ReducerChannels(const ReducerChannels&) = delete;
  ReducerChannels& operator=(const ReducerChannels&) = delete;

  int count() const { return static_cast<int>(reducers_.size()); }
  // Reducers not abandoned, in index order.
  std::vector<int> alive() const;
  const std::string& name(int reducer) const;

  // Queues the transfers of one all-reduce, after those posted before; the buffers must
  // stay valid until wait() returned for it or close() was called. Transfers to an
  // abandoned reducer are lost at once.
  ShardBatchHandle post(std::vector<ShardTransfer> transfers);
  // Blocks until each transfer of `batch` is kDone or kLost. `watch` is called every few
  // milliseconds, without the channels' lock: it may abandon() reducers (news from the other
  // workers) and returns why the job failed (another worker failed), empty while it has not.
  // Throws CollectiveError if a reducer relays a job failure (an abort frame), if `watch()`
  // returns a failure or if cancel() is called. False if the deadline came first.
  bool wait(const ShardBatchHandle& batch, Deadline deadline,
            const std::function<std::string()>& watch);
  // The workers whose chunks the reducers that owe this worker sums still wait for, as their
  // heartbeats said (ascending), and the same in words, naming the reducers and chunks: what
  // a worker that timed out waiting for sums reports.
  // Where `culprits` is not empty, only those workers are named (WaitingFor::describe).
  std::vector<int> awaited_workers() const;
  std::string describe_waits(const std::vector<int>& culprits = {}) const;
  // Stops using a reducer: says goodbye (so that it can tell this from a death) and closes;
  // its unfinished transfers are lost. `why` is logged; false if it was abandoned already.
  bool abandon(int reducer, const std::string& why);
  // The reducers this worker lost by itself (not by abandon()) since the last call, with
  // why: for the other workers to hear, who may still be waiting on them.
  std::vector<std::pair<int, std::string>> take_losses();
  // From any thread: a running or later wait() throws CollectiveError(reason).
  void cancel(const std::string& reason);
  // Stops the progress thread (no buffer is touched afterwards), then says goodbye to every
  // reducer still in use (`failure` empty) or sends it an abort notice with `failure`, which
  // it relays to the other workers. Idempotent.
  void close(const std::string& failure);
  std::vector<ReducerStat> stats() const;

 private:
  struct Reducer;
  void progress_loop();
  bool write_some(Reducer& reducer);
  bool read_some(Reducer& reducer);
  void lose(Reducer& reducer, const std::string& why);
  // Why `reducer` must be dropped for its silence while it owes sums; empty if it need not.
  std::string silence_verdict(Reducer& reducer);
  void settle(ShardBatch& batch, ShardTransfer& transfer, ShardTransfer::State state);
  // `farewell`: kGoodbye, or kAbort with `reason`; none where the reducer broke the protocol.
  void abandon_locked(Reducer& reducer, std::optional<FrameKind> farewell, const std::string& reason = "");
  void say_farewell(Reducer& reducer, FrameKind kind, const std::string& reason);
  void update_interest(Reducer& reducer);
  // Sends each reducer this worker's UCX address and moves its frames to a UCX stream to the
  // address it answers with.
  void switch_to_ucx();
  void drive_ucx();
  void fail(const std::string& reason);
  void wake();

  const int inflight_;
  const double heartbeat_timeout_;
  const std::function<void(const std::string&)> log_;
  std::unique_ptr<StreamWorker> ucx_;  // null unless over UCX; outlives the streams
  std::vector<std::unique_ptr<Reducer>> reducers_;
  Poller poller_;

  mutable std::mutex mutex_;  // guards everything below and each Reducer's exchange state
  std::condition_variable settled_;
  std::string failure_;  // a reducer relayed a job failure, or cancel() was called
  bool stopping_ = false;
  bool closed_ = false;
  std::thread progress_thread_;
};

}  // namespace collectives
