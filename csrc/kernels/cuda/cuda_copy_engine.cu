#include "kernels/cuda/cuda_copy_engine.h"

#include <mutex>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "common/error.h"
#include "staging/ordered_worker.h"

namespace collectives {
namespace {

std::exception_ptr failure(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return nullptr;
  return std::make_exception_ptr(CollectiveError(what + " failed: " + cudaGetErrorString(status)));
}

void check(cudaError_t status, const std::string& what) {
  if (std::exception_ptr error = failure(status, what)) std::rethrow_exception(error);
}

// Makes `device` the calling thread's current GPU until the end of the scope (the caller's
// thread is torch's or cupy's too: it gets its own back).
class OnDevice {
 public:
  explicit OnDevice(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  }
  ~OnDevice() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

class CudaCopyEngine : public CopyEngine {
 public:
  explicit CudaCopyEngine(int device) : device_(device) {
    OnDevice on(device_);
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check(cudaEventCreateWithFlags(&caller_done_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }

  ~CudaCopyEngine() override {
    stop();
    for (cudaEvent_t event : events_) cudaEventDestroy(event);
    cudaEventDestroy(caller_done_);
    cudaStreamDestroy(stream_);
  }

  void* allocate_host(size_t bytes) override {
    OnDevice on(device_);  // else a first call on another thread makes a context on device 0
    void* host = nullptr;
    check(cudaHostAlloc(&host, bytes, cudaHostAllocPortable),
          "cudaHostAlloc of " + std::to_string(bytes) + " bytes of pinned staging memory");
    return host;
  }

  void free_host(void* host) noexcept override { cudaFreeHost(host); }

  void copy(void* dst, const void* src, size_t bytes, Done done) override {
    cudaEvent_t event = nullptr;
    std::exception_ptr error;
    try {
      OnDevice on(device_);
      event = take_event();
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_),
            "cudaMemcpyAsync of " + std::to_string(bytes) + " bytes");
      check(cudaEventRecord(event, stream_), "cudaEventRecord");
    } catch (const CollectiveError&) {
      error = std::current_exception();
    }
    worker_.post([this, event, error, done = std::move(done)] {
      std::exception_ptr outcome = error;
      if (event != nullptr) {
        if (!outcome) outcome = failure(cudaEventSynchronize(event), "cudaEventSynchronize after a staging copy");
        give_event(event);
      }
      done(outcome);
    });
  }

  void follow_caller() override {
    OnDevice on(device_);
    check(cudaEventRecord(caller_done_, cudaStreamLegacy), "cudaEventRecord on the legacy default stream");
    check(cudaStreamWaitEvent(stream_, caller_done_, 0), "cudaStreamWaitEvent");
  }

  void stop() override { worker_.stop(); }

 private:
  cudaEvent_t take_event() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_events_.empty()) {
        cudaEvent_t event = idle_events_.back();
        idle_events_.pop_back();
        return event;
      }
    }
    cudaEvent_t event;
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(event);
    return event;
  }

  void give_event(cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_events_.push_back(event);
  }

  const int device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t caller_done_ = nullptr;  // recorded on the legacy default stream at each call
  std::mutex mutex_;
  std::vector<cudaEvent_t> events_, idle_events_;  // all made; those not in flight
  OrderedWorker worker_;  // last: its jobs use the fields above
};

}  // namespace

std::unique_ptr<CopyEngine> make_cuda_copy_engine(int device) { return std::make_unique<CudaCopyEngine>(device); }

int cuda_device_of(const void* address) {
  cudaPointerAttributes attributes{};
  check(cudaPointerGetAttributes(&attributes, address), "cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    throw CollectiveError("the address is not device memory (cudaPointerGetAttributes)");
  }
  return attributes.device;
}

}  // namespace collectives
