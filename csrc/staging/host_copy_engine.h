// A CopyEngine over host memory: memcpy on the engine's thread. The CPU tests run the staged
// all-reduce's schedule through it (tests/cpp/test_staging.cc, tests/python/test_staging.py);
// CUDA's engine is the one a GPU's buffers take.
#pragma once

#include "staging/copy_engine.h"
#include "staging/ordered_worker.h"

namespace collectives {

class HostCopyEngine : public CopyEngine {
 public:
  void* allocate_host(size_t bytes) override;
  void free_host(void* host) noexcept override;
  void copy(void* dst, const void* src, size_t bytes, Done done) override;
  void stop() override { worker_.stop(); }

 private:
  OrderedWorker worker_;
};

}  // namespace collectives
