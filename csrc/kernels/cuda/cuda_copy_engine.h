// The CopyEngine of a GPU's buffers: copies on a CUDA stream of their own, in pinned host memory,
// each followed by an event that the engine's thread waits on before it calls the copy's Done.
// The stream is a blocking one, so it waits for work queued before on the legacy default stream
// (what torch's and cupy's __dlpack__() synchronise the caller's stream with). Not run on a
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
