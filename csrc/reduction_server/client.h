// A worker's connections to the job's reducers (protocol in reduction_server/server.h).
//
// exchange() sends chunks of the worker's buffer to reducers and receives their sums into the
// same place. Unlike the ring's transport, where any failure ends the job, a reducer that
// fails only loses its chunks: its connection ended, or it sent nothing (no sum, no
// heartbeat) for heartbeat_timeout while it held our chunks. The caller then moves those
// chunks elsewhere. A sum is received into staging memory and copied into the buffer only
// once complete, so a reducer that dies mid-frame leaves the worker's contribution intact
// for the next reducer.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/file_descriptor.h"
#include "transport/frame.h"

namespace collectives {

struct ShardTransfer {
  enum class State { kQueued, kDone, kLost };
  int reducer = 0;
  FrameHeader header;  // unit = chunk index, nbytes = chunk bytes
  char* data = nullptr;  // the chunk: sent from here, the sum received into here
  State state = State::kQueued;
};

struct ReducerStat {
  std::string name;
  bool alive;
  uint64_t bytes_sent;
  uint64_t bytes_received;
};

class ReducerChannels {
 public:
  // fds[r]: the connected, authenticated socket to reducer r (owned from here on).
  ReducerChannels(std::vector<int> fds, std::vector<std::string> names);
  ~ReducerChannels();
  ReducerChannels(const ReducerChannels&) = delete;
  ReducerChannels& operator=(const ReducerChannels&) = delete;

  int count() const { return static_cast<int>(reducers_.size()); }
  // Reducers still in use, in index order (the same on every worker: see abandon()).
  std::vector<int> alive() const;
  const std::string& name(int reducer) const;

  // Runs every transfer until it is kDone or kLost (its reducer failed, which is logged with
  // `log`). At most `inflight` chunks per reducer are unanswered at a time; they are sent in
  // the order given. Throws CollectiveError if a reducer relays a job failure (an abort
  // frame), if `job_failure()` turns non-empty (another worker failed; checked every few
  // milliseconds) or if cancel() is called; TimeoutError at the deadline.
  void exchange(std::vector<ShardTransfer>& transfers, int inflight, double heartbeat_timeout,
                Deadline deadline, const std::function<std::string()>& job_failure,
                const std::function<void(const std::string&)>& log);
  // Stops using a reducer: says goodbye (so that it can tell this from a death) and closes.
  // Workers abandon the same reducers at the same point of the same collective, so alive()
  // stays equal across workers.
  void abandon(int reducer);
  // From any thread: a running or later exchange() throws CollectiveError(reason).
  void cancel(const std::string& reason);
  // Goodbye to every reducer still in use (clean) or just close (after a failure, so that
  // the reducers tell the other workers).
  void close(bool clean);
  std::vector<ReducerStat> stats() const;

 private:
  struct Reducer;
  void lose(Reducer& reducer, std::vector<ShardTransfer>& transfers, const std::string& why,
            const std::function<void(const std::string&)>& log);
  void wake();

  std::vector<std::unique_ptr<Reducer>> reducers_;
  FileDescriptor epoll_fd_, wake_fd_;
  mutable std::mutex mutex_;  // guards cancelled_ and the sockets' lifetime against close()
  std::string cancelled_;
};

}  // namespace collectives
