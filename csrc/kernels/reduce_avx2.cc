// The AVX2 level (with F16C for float16): 256-bit vectors of 8 floats or 4 doubles. Built with
// -mavx2 -mf16c -O3; integer loops are left to the compiler's vectoriser.
#include <immintrin.h>

#include <array>

#include "kernels/levels.h"
#include "kernels/reduce_impl.h"

namespace collectives {
namespace kernels {
namespace {

// __m256 and __m256d without their may_alias attribute, which a template argument such as
// std::array's cannot carry; values convert to and from the intrinsics' types implicitly.
typedef float F32x8 __attribute__((vector_size(32)));
typedef double F64x4 __attribute__((vector_size(32)));

// The primitives reduce_impl.h's loops are written in; see Scalar there for the contract.
// A block is two vectors (16 floats or 8 doubles): two independent chains per iteration.
struct Avx2 {
  using Floats = std::array<F32x8, 2>;
  using Doubles = std::array<F64x4, 2>;

  template <class T>
  static constexpr size_t lanes = 2 * sizeof(__m256) / sizeof(Compute<T>);

  static Floats load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Doubles load(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
  static Floats load(const Float16* p) { return {load8(p), load8(p + 8)}; }
  /*
   * 16 bfloat16 in one 256-bit load, seen as 8 32-bit lanes that each hold two of them:
   * element 2k in the low half, 2k+1 in the high half. A bfloat16 is the top half of its
   * float32, so the even elements become floats by shifting left 16 and the odd ones by
   * clearing the low half. The block holds [even, odd]; store() interleaves them back.
   * No shuffles: only shifts and logic, which every vector port executes.
   */
  static Floats load(const BFloat16* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(~0xFFFF)))};
  }

  static void store(float* p, const Floats& v) {
    _mm256_storeu_ps(p, v[0]);
    _mm256_storeu_ps(p + 8, v[1]);
  }
  static void store(double* p, const Doubles& v) {
    _mm256_storeu_pd(p, v[0]);
    _mm256_storeu_pd(p + 4, v[1]);
  }
  static void store(Float16* p, const Floats& v) {
    store8(p, v[0]);
    store8(p + 8, v[1]);
  }
  static void store(BFloat16* p, const Floats& v) {
    store_bfloat16(p, round_to_bfloat16(v[0]), round_to_bfloat16(v[1]));
  }

  // Only bfloat16 rounds faster without NaNs; F16C's vcvtps2ph handles them itself.
  template <class T, class Block>
  static void store_numbers(T* p, const Block& v) {
    store(p, v);
  }
  static void store_numbers(BFloat16* p, const Floats& v) {
    store_bfloat16(p, round_numbers_to_bfloat16(v[0]), round_numbers_to_bfloat16(v[1]));
  }

  // An unordered compare of two vectors flags the lanes where either is NaN, so one compare
  // covers a block (and the compiler merges the two when x and y are the same block).
  static bool any_nan(const Floats& x, const Floats& y) {
    const __m256 m = _mm256_or_ps(_mm256_cmp_ps(x[0], x[1], _CMP_UNORD_Q),
                                  _mm256_cmp_ps(y[0], y[1], _CMP_UNORD_Q));
    return !_mm256_testz_ps(m, m);
  }
  static bool any_nan(const Doubles& x, const Doubles& y) {
    const __m256d m = _mm256_or_pd(_mm256_cmp_pd(x[0], x[1], _CMP_UNORD_Q),
                                   _mm256_cmp_pd(y[0], y[1], _CMP_UNORD_Q));
    return !_mm256_testz_pd(m, m);
  }

  static F32x8 splat(float x) { return _mm256_set1_ps(x); }
  static F64x4 splat(double x) { return _mm256_set1_pd(x); }

  // vminps(x, y) is x < y ? x : y, so the operands go in swapped to get b < a ? b : a.
  static F32x8 min(F32x8 a, F32x8 b) { return _mm256_min_ps(b, a); }
  static F64x4 min(F64x4 a, F64x4 b) { return _mm256_min_pd(b, a); }
  static F32x8 max(F32x8 a, F32x8 b) { return _mm256_max_ps(b, a); }
  static F64x4 max(F64x4 a, F64x4 b) { return _mm256_max_pd(b, a); }

  static F32x8 first_nan_or(F32x8 a, F32x8 b, F32x8 r) {
    r = _mm256_blendv_ps(r, b, _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_ps(r, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  static F64x4 first_nan_or(F64x4 a, F64x4 b, F64x4 r) {
    r = _mm256_blendv_pd(r, b, _mm256_cmp_pd(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_pd(r, a, _mm256_cmp_pd(a, a, _CMP_UNORD_Q));
  }

 private:
  static __m256 load8(const Float16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store8(Float16* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  /*
   * float32 -> bfloat16 exactly as narrow_to_bfloat16 in half.h, 8 at a time, leaving each
   * result in the high 16 bits of its lane (the low 16 bits are garbage):
   *   u + 0x7FFF + ((u >> 16) & 1)   for numbers (no 32-bit wrap: the largest non-NaN pattern
   *                                  is -inf, 0xFF800000),
   *   u | 0x00400000                 for NaN (the quiet bit; the payload's top bits kept).
   */
  static __m256i round_numbers_to_bfloat16(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  }
  static __m256i round_to_bfloat16(__m256 v) {
    const __m256i quiet_nan =
        _mm256_or_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x00400000));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(round_numbers_to_bfloat16(v), quiet_nan, is_nan);
  }
  // Interleaves the rounded [even, odd] halves of a block back into 16 bfloat16: the even
  // elements' results shift down to the low half of each lane, and the odd elements' high
  // halves go beside them (blend mask 0xAA: odd 16-bit words from the second operand).
  static void store_bfloat16(BFloat16* p, __m256i even, __m256i odd) {
    const __m256i x = _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xAA);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  }
};

}  // namespace

namespace avx2 {

void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op) {
  reduce_with<Avx2>(dst, src, count, dtype, op);
}

void divide(void* data, size_t count, DataType dtype, double divisor) {
  divide_with<Avx2>(data, count, dtype, divisor);
}

}  // namespace avx2
}  // namespace kernels
}  // namespace collectives
