// Picks the reduction kernels' SIMD level at run time, so that one build runs on any x86-64
// (and, built elsewhere, has only the scalar level).
#ifdef COLLECTIVES_HAVE_X86_SIMD
#include <cpuid.h>
#endif

#include <stdexcept>
#include <string>

#include "kernels/levels.h"
#include "kernels/reduce.h"

namespace collectives {
namespace {

#ifdef COLLECTIVES_HAVE_X86_SIMD
// F16C from CPUID itself: clang before 15 has no "f16c" for __builtin_cpu_supports. Its
// registers are AVX's, whose OS support the "avx2" check below covers.
bool has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}

// __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0). The
// AVX-512 unit is built with flags that imply AVX2, so its level needs AVX2 and F16C too.
SimdLevel detect_simd_level() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && has_f16c();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx2 && avx512) return SimdLevel::kAvx512;
  if (avx2) return SimdLevel::kAvx2;
  return SimdLevel::kScalar;
}
#else
SimdLevel detect_simd_level() { return SimdLevel::kScalar; }
#endif

void check_supported(SimdLevel level) {
  if (!simd_level_supported(level)) {
    throw std::invalid_argument(std::string("SIMD level ") + to_string(level) +
                                " is not supported by this CPU or build (best: " +
                                to_string(best_simd_level()) + ")");
  }
}

}  // namespace

SimdLevel best_simd_level() {
  static const SimdLevel best = detect_simd_level();
  return best;
}

// The levels are nested: a CPU with a level has every lower one.
bool simd_level_supported(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar:
    case SimdLevel::kAvx2:
    case SimdLevel::kAvx512:
      return static_cast<int>(level) <= static_cast<int>(best_simd_level());
  }
  return false;
}

const char* to_string(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar: return "scalar";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512: return "avx512";
  }
  return "unknown-simd-level";
}

void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op,
                 SimdLevel level) {
  check_supported(level);
  switch (level) {
#ifdef COLLECTIVES_HAVE_X86_SIMD
    case SimdLevel::kAvx512:
      return kernels::avx512::reduce_into(dst, src, count, dtype, op);
    case SimdLevel::kAvx2:
      return kernels::avx2::reduce_into(dst, src, count, dtype, op);
#endif
    default:
      return kernels::scalar::reduce_into(dst, src, count, dtype, op);
  }
}

void divide(void* data, size_t count, DataType dtype, double divisor, SimdLevel level) {
  check_supported(level);
  switch (level) {
#ifdef COLLECTIVES_HAVE_X86_SIMD
    case SimdLevel::kAvx512:
      return kernels::avx512::divide(data, count, dtype, divisor);
    case SimdLevel::kAvx2:
      return kernels::avx2::divide(data, count, dtype, divisor);
#endif
    default:
      return kernels::scalar::divide(data, count, dtype, divisor);
  }
}

}  // namespace collectives
