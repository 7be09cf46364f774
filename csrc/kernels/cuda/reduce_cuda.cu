#include "kernels/cuda/reduce_cuda.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/error.h"

namespace collectives {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw CollectiveError(std::string(what) + " failed: " + cudaGetErrorString(status));
  }
}

// Each element type's float32 view and its rounding back (nearest-even).
template <class T> struct Widened;
template <> struct Widened<float> {
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <> struct Widened<__half> {
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <> struct Widened<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <ReduceOp kOp>
__device__ float apply(float a, float b) {
  if (a != a) return a;  // the NaN rule: the destination's NaN, else the source's
  if (b != b) return b;
  if constexpr (kOp == ReduceOp::kSum) return __fadd_rn(a, b);  // never fused
  if constexpr (kOp == ReduceOp::kProd) return __fmul_rn(a, b);
  if constexpr (kOp == ReduceOp::kMin) return b < a ? b : a;
  if constexpr (kOp == ReduceOp::kMax) return b > a ? b : a;
}

// A grid-stride loop: any count with a bounded grid.
template <class T, ReduceOp kOp>
__global__ void reduce_kernel(T* dst, const T* src, size_t count) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count; i += size_t{gridDim.x} * blockDim.x) {
    dst[i] = Widened<T>::store(apply<kOp>(Widened<T>::load(dst[i]), Widened<T>::load(src[i])));
  }
}

template <class T>
void launch(void* dst, const void* src, size_t count, ReduceOp op) {
  constexpr unsigned kThreads = 256, kMaxBlocks = 4096;
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>(kMaxBlocks, (count + kThreads - 1) / kThreads));
  T* d = static_cast<T*>(dst);
  const T* s = static_cast<const T*>(src);
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: reduce_kernel<T, ReduceOp::kSum><<<blocks, kThreads>>>(d, s, count); break;
    case ReduceOp::kMin: reduce_kernel<T, ReduceOp::kMin><<<blocks, kThreads>>>(d, s, count); break;
    case ReduceOp::kMax: reduce_kernel<T, ReduceOp::kMax><<<blocks, kThreads>>>(d, s, count); break;
    case ReduceOp::kProd: reduce_kernel<T, ReduceOp::kProd><<<blocks, kThreads>>>(d, s, count); break;
  }
}

}  // namespace

int cuda_devices() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

std::string cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

bool cuda_reduces(DataType dtype, ReduceOp) {
  return dtype == DataType::kFloat32 || dtype == DataType::kFloat16 || dtype == DataType::kBFloat16;
}

void cuda_reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op) {
  if (!cuda_reduces(dtype, op)) {
    throw CollectiveError(std::string("the CUDA kernels reduce float32, float16 and bfloat16, not ") + to_string(dtype));
  }
  if (count == 0) return;
  switch (dtype) {
    case DataType::kFloat32: launch<float>(dst, src, count, op); break;
    case DataType::kFloat16: launch<__half>(dst, src, count, op); break;
    default: launch<__nv_bfloat16>(dst, src, count, op); break;
  }
  check(cudaGetLastError(), "launching the CUDA reduction");
  check(cudaDeviceSynchronize(), "the CUDA reduction");
}

}  // namespace collectives
