// Reduction kernels for device memory (CUDA), with the CPU kernels' semantics
// (kernels/reduce_impl.h): float16/bfloat16 widened to float32, combined, rounded back to
// nearest-even; min/max keep the destination on a tie; a NaN in the destination wins, else
// one in the source. Built where CMake finds a CUDA toolkit (COLLECTIVES_WITH_CUDA); the
// runtime is linked statically, so the extension imports on a machine without a GPU or a
// driver, where cuda_devices() is 0.
#pragma once

#include <cstddef>
#include <string>

#include "common/types.h"

namespace collectives {

// GPUs this process can use; 0 without a driver or a device.
int cuda_devices();
// The CUDA runtime's version, as "13.0".
std::string cuda_runtime_version();

// Whether the device kernels reduce this dtype and op: float32, float16, bfloat16 with sum,
// avg (as sum), min, max, prod.
bool cuda_reduces(DataType dtype, ReduceOp op);

// dst[i] = dst[i] (op) src[i] for count elements of device memory, on the default stream,
// and waits for it. CollectiveError if CUDA fails or cuda_reduces() is false.
void cuda_reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op);

}  // namespace collectives
