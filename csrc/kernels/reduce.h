// Element-wise reduction kernels, vectorised per SIMD level and chosen at run time, so one
// build runs on any x86-64 (and falls back to the scalar path elsewhere).
#pragma once

#include <cstddef>

#include "common/types.h"

namespace collectives {

enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumSimdLevels = 3;

// The best level this CPU supports and this build contains.
SimdLevel best_simd_level();
bool simd_level_supported(SimdLevel level);
const char* to_string(SimdLevel level);

// dst[i] = dst[i] (op) src[i] for i < count. kAvg reduces as kSum (the division is separate,
// see divide()). Every level gives bit-identical results to kScalar. Integers wrap as in
// numpy; float16/bfloat16 are widened to float32, combined, and rounded back to nearest-even.
// dst and src may be the same buffer but must not otherwise overlap; any alignment is fine.
// The NaN and signed-zero rules are spelled out in kernels/reduce_impl.h.
void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op,
                 SimdLevel level);
inline void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op) {
  reduce_into(dst, src, count, dtype, op, best_simd_level());
}

// data[i] = data[i] / divisor for floating dtypes (float16/bfloat16 through float32): the
// one division that turns a sum into an average. std::invalid_argument for integer dtypes.
void divide(void* data, size_t count, DataType dtype, double divisor, SimdLevel level);
inline void divide(void* data, size_t count, DataType dtype, double divisor) {
  divide(data, count, dtype, divisor, best_simd_level());
}

// Conversions between float16/bfloat16 and float32, for sums kept in float32 and rounded
// once (the reduction server's). narrow() rounds to nearest-even, as reduce_into() does.
// std::invalid_argument for other dtypes.
void widen(float* dst, const void* src, size_t count, DataType dtype);
void narrow(void* dst, const float* src, size_t count, DataType dtype);

}  // namespace collectives
