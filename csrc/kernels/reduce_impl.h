// The reduction and division loops, written once for every dtype, op and SIMD level.
//
// Each level's translation unit (reduce_scalar.cc, reduce_avx2.cc, reduce_avx512.cc) includes
// this header, describes its vectors with a small struct of primitives (the shape of `Scalar`
// below), and instantiates reduce_with<Level> / divide_with<Level> under its own target flags.
// Like half.h, everything here has internal linkage so that no AVX copy of a shared template
// can be picked by the linker for the scalar path.
//
// Semantics (the contract every level meets bit for bit):
//  - Integers wrap (two's complement), computed in unsigned arithmetic.
//  - Floating values are combined in their compute type: float for float16/bfloat16/float32,
//    double for float64; half types are rounded back once, to nearest-even.
//  - min(a, b) = (b < a ? b : a) and max(a, b) = (b > a ? b : a): on a tie (+0 vs -0) the
//    destination's value stays.
//  - NaN: if the destination element is NaN the result is that NaN, else if the source element
//    is NaN the result is that one; its bits pass unchanged for float32/float64 and get the
//    quiet bit when rounded back to float16/bfloat16. The hardware's own choice between two
//    NaN operands depends on which register the compiler put first (addition is commutative
//    to the compiler), so we decide it ourselves.
//  - Division is one IEEE division by the divisor converted to the compute type (the
//    dividend is always the first operand, so a NaN result is the same at every level).
//  - dst and src may be the same buffer, but must not otherwise overlap.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/types.h"
#include "kernels/half.h"

namespace collectives {
namespace kernels {
namespace {

// The type arithmetic happens in, and the conversions to and from it.
template <class T>
struct Arith {
  using Compute = T;
  static T widen(T x) { return x; }
  static T narrow(T x) { return x; }
};
template <>
struct Arith<Float16> {
  using Compute = float;
  static float widen(Float16 x) { return kernels::widen(x); }
  static Float16 narrow(float x) { return narrow_to_float16(x); }
};
template <>
struct Arith<BFloat16> {
  using Compute = float;
  static float widen(BFloat16 x) { return kernels::widen(x); }
  static BFloat16 narrow(float x) { return narrow_to_bfloat16(x); }
};

template <class T>
using Compute = typename Arith<T>::Compute;

// Buffers come off the network at any byte offset, so element accesses go through memcpy
// (a plain load or store after optimisation) instead of dereferencing a misaligned pointer.
template <class T>
T load_element(const T* p) {
  T x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <class T>
void store_element(T* p, T x) {
  std::memcpy(p, &x, sizeof x);
}

// The primitives a level provides, here for the scalar level (which is also the tail of every
// vector loop). load() turns lanes<T> elements into a block, a std::array of the level's
// vectors of Compute<T> (here: one value); store() rounds a block back. A block may keep its
// elements in any order, as long as store() undoes what load() did, since everything between
// is element-wise. The loops use + * / on the vectors: the language's operators here, the
// GCC/Clang vector-extension operators on the SIMD levels' __m256/__m512 types.
struct Scalar {
  template <class T>
  static constexpr size_t lanes = 1;

  template <class T>
  static std::array<Compute<T>, 1> load(const T* p) {
    return {Arith<T>::widen(load_element(p))};
  }
  template <class T>
  static void store(T* p, const std::array<Compute<T>, 1>& block) {
    store_element(p, Arith<T>::narrow(block[0]));
  }
  // store() for a block known to hold no NaN (a level may round faster then).
  template <class T>
  static void store_numbers(T* p, const std::array<Compute<T>, 1>& block) {
    store(p, block);
  }
  // Whether any element of x or y is NaN.
  template <class F>
  static bool any_nan(const std::array<F, 1>& x, const std::array<F, 1>& y) {
    return x[0] != x[0] || y[0] != y[0];
  }
  template <class F>
  static F splat(F x) {
    return x;
  }
  template <class F>
  static F min(F a, F b) {
    return b < a ? b : a;
  }
  template <class F>
  static F max(F a, F b) {
    return b > a ? b : a;
  }
  // a if a is NaN, else b if b is NaN, else r.
  template <class F>
  static F first_nan_or(F a, F b, F r) {
    if (a != a) return a;
    if (b != b) return b;
    return r;
  }
};

// The operation alone; reduce_loop applies the NaN rule on top where a block holds a NaN.
template <class S, ReduceOp kOp, class V>
V apply_floating(V a, V b) {
  if constexpr (kOp == ReduceOp::kSum) {
    return a + b;
  } else if constexpr (kOp == ReduceOp::kProd) {
    return a * b;
  } else if constexpr (kOp == ReduceOp::kMin) {
    return S::min(a, b);
  } else {
    static_assert(kOp == ReduceOp::kMax, "kAvg is reduced as kSum");
    return S::max(a, b);
  }
}

// Unsigned arithmetic wraps without undefined behaviour; types narrower than unsigned int are
// widened to it first (they would otherwise be promoted to signed int, and a product of two
// 16-bit values could overflow that).
template <ReduceOp kOp, class T>
T combine_integer(T a, T b) {
  using U = std::conditional_t<(sizeof(T) < sizeof(unsigned)), unsigned, std::make_unsigned_t<T>>;
  if constexpr (kOp == ReduceOp::kSum) {
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else if constexpr (kOp == ReduceOp::kProd) {
    return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
  } else if constexpr (kOp == ReduceOp::kMin) {
    return b < a ? b : a;
  } else {
    static_assert(kOp == ReduceOp::kMax, "kAvg is reduced as kSum");
    return b > a ? b : a;
  }
}

template <class S, ReduceOp kOp, class T>
void reduce_loop(T* dst, const T* src, size_t count) {
  if constexpr (std::is_integral_v<T>) {
    // A plain loop: the compiler vectorises it for the SIMD levels' target flags (and
    // reduce_scalar.cc is built with -fno-tree-vectorize so that the reference stays scalar).
    for (size_t i = 0; i < count; ++i) {
      store_element(dst + i, combine_integer<kOp>(load_element(dst + i), load_element(src + i)));
    }
  } else {
    constexpr size_t kLanes = S::template lanes<T>;
    size_t i = 0;
    for (; i + kLanes <= count; i += kLanes) {
      const auto a = S::load(dst + i);
      const auto b = S::load(src + i);
      auto r = a;
      for (size_t j = 0; j < r.size(); ++j) r[j] = apply_floating<S, kOp>(a[j], b[j]);
      // NaNs are rare, so one test per block keeps the NaN rule off the common path. A sum or
      // product is NaN wherever an operand is, so testing the result finds every NaN operand
      // (and the NaNs that inf - inf or 0 * inf make); min and max can drop a NaN operand
      // (vminps returns its second one), so for them test the operands.
      constexpr bool kDropsNan = kOp == ReduceOp::kMin || kOp == ReduceOp::kMax;
      if (!(kDropsNan ? S::any_nan(a, b) : S::any_nan(r, r))) {
        S::store_numbers(dst + i, r);
        continue;
      }
      for (size_t j = 0; j < r.size(); ++j) r[j] = S::first_nan_or(a[j], b[j], r[j]);
      S::store(dst + i, r);
    }
    if constexpr (kLanes > 1) reduce_loop<Scalar, kOp>(dst + i, src + i, count - i);
  }
}

template <class S, class T>
void reduce_typed(void* dst, const void* src, size_t count, ReduceOp op) {
  T* d = static_cast<T*>(dst);
  const T* s = static_cast<const T*>(src);
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return reduce_loop<S, ReduceOp::kSum>(d, s, count);
    case ReduceOp::kProd:
      return reduce_loop<S, ReduceOp::kProd>(d, s, count);
    case ReduceOp::kMin:
      return reduce_loop<S, ReduceOp::kMin>(d, s, count);
    case ReduceOp::kMax:
      return reduce_loop<S, ReduceOp::kMax>(d, s, count);
  }
  throw std::invalid_argument("unknown reduce op " + std::to_string(static_cast<int>(op)));
}

template <class S>
void reduce_with(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op) {
  switch (dtype) {
    case DataType::kFloat16: return reduce_typed<S, Float16>(dst, src, count, op);
    case DataType::kBFloat16: return reduce_typed<S, BFloat16>(dst, src, count, op);
    case DataType::kFloat32: return reduce_typed<S, float>(dst, src, count, op);
    case DataType::kFloat64: return reduce_typed<S, double>(dst, src, count, op);
    case DataType::kInt8: return reduce_typed<S, int8_t>(dst, src, count, op);
    case DataType::kUInt8: return reduce_typed<S, uint8_t>(dst, src, count, op);
    case DataType::kInt32: return reduce_typed<S, int32_t>(dst, src, count, op);
    case DataType::kInt64: return reduce_typed<S, int64_t>(dst, src, count, op);
  }
  throw std::invalid_argument("unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

template <class S, class T>
void divide_loop(T* data, size_t count, Compute<T> divisor) {
  constexpr size_t kLanes = S::template lanes<T>;
  const auto d = S::splat(divisor);
  size_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    auto x = S::load(data + i);
    for (auto& v : x) v = v / d;
    S::store(data + i, x);  // not store_numbers(): NaN elements, a NaN divisor, 0/0 make NaNs
  }
  if constexpr (kLanes > 1) divide_loop<Scalar>(data + i, count - i, divisor);
}

template <class S, class T>
void divide_typed(void* data, size_t count, double divisor) {
  divide_loop<S>(static_cast<T*>(data), count, static_cast<Compute<T>>(divisor));
}

template <class S>
void divide_with(void* data, size_t count, DataType dtype, double divisor) {
  switch (dtype) {
    case DataType::kFloat16: return divide_typed<S, Float16>(data, count, divisor);
    case DataType::kBFloat16: return divide_typed<S, BFloat16>(data, count, divisor);
    case DataType::kFloat32: return divide_typed<S, float>(data, count, divisor);
    case DataType::kFloat64: return divide_typed<S, double>(data, count, divisor);
    default:
      throw std::invalid_argument(std::string("divide needs a floating dtype, got ") +
                                  to_string(dtype));
  }
}

}  // namespace
}  // namespace kernels
}  // namespace collectives
