// The entry points of each SIMD level, one translation unit each, compiled with that level's
// target flags. Only dispatch.cc calls them, after checking that the CPU has the level.
#pragma once

#include <cstddef>

#include "common/types.h"

namespace collectives {
namespace kernels {

namespace scalar {
void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op);
void divide(void* data, size_t count, DataType dtype, double divisor);
}  // namespace scalar

#ifdef COLLECTIVES_HAVE_X86_SIMD
namespace avx2 {
void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op);
void divide(void* data, size_t count, DataType dtype, double divisor);
}  // namespace avx2

namespace avx512 {
void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op);
void divide(void* data, size_t count, DataType dtype, double divisor);
}  // namespace avx512
#endif

}  // namespace kernels
}  // namespace collectives
