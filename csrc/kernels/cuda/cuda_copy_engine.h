// The CopyEngine of a GPU's buffers: copies on a CUDA stream of their own (non-blocking: the
// caller's kernels go on beside it), to and from pinned host memory, each followed by an event
// that the engine's thread waits on before it calls the copy's Done. A call's copies wait for
// the work queued on the legacy default stream before it (follow_caller), with which DLPack's
// __dlpack__(stream=1) synchronises the producer's stream (collectives/_device.py). Not run on a
// machine without a GPU: tests/gpu/check_cuda.py runs it where there is one.
#pragma once

#include <memory>

#include "staging/copy_engine.h"

namespace collectives {

// The engine for buffers on GPU `device`; CollectiveError naming the CUDA call that failed.
std::unique_ptr<CopyEngine> make_cuda_copy_engine(int device);
// The GPU that the device memory at `address` is on; CollectiveError if it is not device memory.
int cuda_device_of(const void* address);

}  // namespace collectives
