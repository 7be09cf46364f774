// The copies of a staged all-reduce (staged_allreduce.h) between the caller's buffer and host
// memory, behind one small interface: CUDA's (kernels/cuda/cuda_copy_engine.h: a stream and
// events), and one over host memory (host_copy_engine.h) through which the tests of a machine
// without a GPU run the very same schedule.
#pragma once

#include <cstddef>
#include <exception>
#include <functional>

namespace collectives {

class CopyEngine {
 public:
  // Called once a copy is complete (null) or has failed (its error).
  using Done = std::function<void(std::exception_ptr)>;

  virtual ~CopyEngine() = default;
  // Host memory that the engine copies to and from at full speed (pinned, for CUDA); returned
  // through free_host. CollectiveError if it cannot be had.
  virtual void* allocate_host(size_t bytes) = 0;
  virtual void free_host(void* host) noexcept = 0;
  // Starts copying `bytes` from src to dst (either way between the buffer and host memory) and
  // returns. Copies run one after another in the order issued, and their `done` calls follow in
  // that order, on the engine's own thread: a `done` may issue more copies, and must not block.
  virtual void copy(void* dst, const void* src, size_t bytes, Done done) = 0;
  // Orders the copies issued from now on after the work the calling thread queued on the
  // device before (CUDA: on the legacy default stream); nothing to do for host memory.
  // CollectiveError if it cannot.
  virtual void follow_caller() {}
  // Waits for every copy issued and its `done`; none may be issued after.
  virtual void stop() = 0;
};

}  // namespace collectives
