// The AVX-512 level (F, BW, VL, DQ): 512-bit vectors of 16 floats or 8 doubles, NaN lanes
// picked with mask registers. Built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mf16c
// -O3; integer loops are left to the compiler's vectoriser.

// GCC 12 reports its own _mm512_undefined_* placeholders as "maybe uninitialized" once the
// intrinsics are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <array>

#include "kernels/levels.h"
#include "kernels/reduce_impl.h"

namespace collectives {
namespace kernels {
namespace {

// __m512 and __m512d without their may_alias attribute, which a template argument such as
// std::array's cannot carry; values convert to and from the intrinsics' types implicitly.
typedef float F32x16 __attribute__((vector_size(64)));
typedef double F64x8 __attribute__((vector_size(64)));

// The primitives reduce_impl.h's loops are written in; see Scalar there for the contract.
// A block is two vectors (32 floats or 16 doubles): two independent chains per iteration.
struct Avx512 {
  using Floats = std::array<F32x16, 2>;
  using Doubles = std::array<F64x8, 2>;

  template <class T>
  static constexpr size_t lanes = 2 * sizeof(__m512) / sizeof(Compute<T>);

  static Floats load(const float* p) { return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)}; }
  static Doubles load(const double* p) { return {_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8)}; }
  static Floats load(const Float16* p) { return {load16(p), load16(p + 16)}; }
  /*
   * 32 bfloat16 in one 512-bit load, seen as 16 32-bit lanes that each hold two of them:
   * element 2k in the low half, 2k+1 in the high half. A bfloat16 is the top half of its
   * float32, so the even elements become floats by shifting left 16 and the odd ones by
   * clearing the low half. The block holds [even, odd]; store() interleaves them back.
   */
  static Floats load(const BFloat16* p) {
    const __m512i x = _mm512_loadu_si512(p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(~0xFFFF)))};
  }

  static void store(float* p, const Floats& v) {
    _mm512_storeu_ps(p, v[0]);
    _mm512_storeu_ps(p + 16, v[1]);
  }
  static void store(double* p, const Doubles& v) {
    _mm512_storeu_pd(p, v[0]);
    _mm512_storeu_pd(p + 8, v[1]);
  }
  static void store(Float16* p, const Floats& v) {
    store16(p, v[0]);
    store16(p + 16, v[1]);
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
    return (_mm512_cmp_ps_mask(x[0], x[1], _CMP_UNORD_Q) |
            _mm512_cmp_ps_mask(y[0], y[1], _CMP_UNORD_Q)) != 0;
  }
  static bool any_nan(const Doubles& x, const Doubles& y) {
    return (_mm512_cmp_pd_mask(x[0], x[1], _CMP_UNORD_Q) |
            _mm512_cmp_pd_mask(y[0], y[1], _CMP_UNORD_Q)) != 0;
  }

  static F32x16 splat(float x) { return _mm512_set1_ps(x); }
  static F64x8 splat(double x) { return _mm512_set1_pd(x); }

  // vminps(x, y) is x < y ? x : y, so the operands go in swapped to get b < a ? b : a.
  static F32x16 min(F32x16 a, F32x16 b) { return _mm512_min_ps(b, a); }
  static F64x8 min(F64x8 a, F64x8 b) { return _mm512_min_pd(b, a); }
  static F32x16 max(F32x16 a, F32x16 b) { return _mm512_max_ps(b, a); }
  static F64x8 max(F64x8 a, F64x8 b) { return _mm512_max_pd(b, a); }

  // mask_blend(k, x, y) takes y where k is set.
  static F32x16 first_nan_or(F32x16 a, F32x16 b, F32x16 r) {
    r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q), r, b);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), r, a);
  }
  static F64x8 first_nan_or(F64x8 a, F64x8 b, F64x8 r) {
    r = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(b, b, _CMP_UNORD_Q), r, b);
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q), r, a);
  }

 private:
  static __m512 load16(const Float16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store16(Float16* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  /*
   * float32 -> bfloat16 exactly as narrow_to_bfloat16 in half.h, 16 at a time, leaving each
   * result in the high 16 bits of its lane (the low 16 bits are garbage):
   *   u + 0x7FFF + ((u >> 16) & 1)   for numbers (no 32-bit wrap: the largest non-NaN pattern
   *                                  is -inf, 0xFF800000),
   *   u | 0x00400000                 for NaN (the quiet bit; the payload's top bits kept).
   */
  static __m512i round_numbers_to_bfloat16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  }
  static __m512i round_to_bfloat16(__m512 v) {
    const __m512i quiet_nan =
        _mm512_or_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x00400000));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                   round_numbers_to_bfloat16(v), quiet_nan);
  }
  // Interleaves the rounded [even, odd] halves of a block back into 32 bfloat16: the even
  // elements' results shift down to the low half of each lane, and the odd elements' high
  // halves go beside them (mask 0xAAAAAAAA: odd 16-bit words from the second operand).
  static void store_bfloat16(BFloat16* p, __m512i even, __m512i odd) {
    _mm512_storeu_si512(p, _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(even, 16), odd));
  }
};

}  // namespace

namespace avx512 {

void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op) {
  reduce_with<Avx512>(dst, src, count, dtype, op);
}

void divide(void* data, size_t count, DataType dtype, double divisor) {
  divide_with<Avx512>(data, count, dtype, divisor);
}

}  // namespace avx512
}  // namespace kernels
}  // namespace collectives
