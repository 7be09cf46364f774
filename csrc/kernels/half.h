// Storage types for the two 16-bit floating formats and their scalar conversions to and from
// float32. These are the reference semantics; the SIMD levels (F16C for float16, integer
// shifts for bfloat16) must give the same bits.
//
// Everything here has internal linkage on purpose: this header is compiled into the scalar,
// AVX2 and AVX-512 translation units with different target flags, and an inline function with
// external linkage would let the linker keep one copy (say the AVX2 one) for all of them,
// which faults on a CPU without AVX2.
#pragma once

#include <cstdint>
#include <cstring>

namespace collectives {
namespace kernels {
namespace {

struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/*
 * IEEE binary16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits.
 * binary32:      1 sign bit, 8 exponent bits (bias 127), 23 mantissa bits.
 * A normal half moves to float by rebiasing the exponent (+112 = 127 - 15) and shifting the
 * mantissa up by 13 = 23 - 10. A subnormal half is mant * 2^-24, which float holds exactly.
 * Inf and NaN keep their payload; widening never rounds.
 */
inline float widen(Float16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu;
  const uint32_t mant = h.bits & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) return bits_float(sign | float_bits(static_cast<float>(mant) * 0x1p-24f));
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

/*
 * float32 -> binary16, round to nearest, ties to even (what F16C's vcvtps2ph does with
 * imm8 = _MM_FROUND_TO_NEAREST_INT, independent of MXCSR).
 *   NaN:            keep the top 10 payload bits and set the quiet bit (0x200).
 *   |f| >= 2^-14:   a normal half, unless rounding carries past 65504 into inf. Adding
 *                   0xFFF + lsb to the 13 bits that are dropped rounds to nearest-even; a
 *                   carry out of the mantissa bumps the exponent, which is what we want, and
 *                   a carry past the largest exponent gives exactly 0x7C00 (inf). Inputs of
 *                   2^16 and above (and float inf) are caught first.
 *   below 2^-14:    a subnormal half counts units of 2^-24. The float's 24-bit significand m
 *                   is worth m * 2^(e-150) with e its biased exponent, i.e. m >> (126 - e)
 *                   such units; round what is shifted out to nearest-even. Below 2^-25 (e <
 *                   102) everything rounds to zero; a result of 0x400 is the smallest normal,
 *                   which is the right encoding too.
 */
inline Float16 narrow_to_float16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) {
    return {static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu))};
  }
  if (abs >= 0x47800000u) return {static_cast<uint16_t>(sign | 0x7C00u)};
  if (abs >= 0x38800000u) {
    const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
    return {static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13))};
  }
  const uint32_t e = abs >> 23;
  if (e < 102) return {sign};
  const uint32_t m = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - e;  // 14..24
  const uint32_t dropped = m & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  uint32_t q = m >> shift;
  if (dropped > halfway || (dropped == halfway && (q & 1u))) ++q;
  return {static_cast<uint16_t>(sign | q)};
}

// bfloat16 is the top half of a float32, so widening is a shift.
inline float widen(BFloat16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

/*
 * float32 -> bfloat16, round to nearest, ties to even: add 0x7FFF plus the lsb that is kept
 * (bit 16) and drop the low 16 bits. A carry into the exponent is the correct rounding, also
 * from the largest finite value up to inf. NaN must not go through that add (0x7FFFFFFF would
 * carry into the sign bit and come out as -0), so it keeps its top payload bits and gets the
 * quiet bit (0x40), which also keeps a NaN whose payload lives only in the low bits a NaN.
 */
inline BFloat16 narrow_to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
  return {static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

}  // namespace
}  // namespace kernels
}  // namespace collectives
