// Tests of the reduction kernels: every SIMD level against the scalar level bit for bit, the
// scalar level against independent references, and the error paths. Plain C++17, no test
// framework: prints each failure and exits nonzero if there was one.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/types.h"
#include "kernels/reduce.h"

namespace collectives {
namespace {

const DataType kAllTypes[] = {DataType::kFloat16, DataType::kBFloat16, DataType::kFloat32,
                              DataType::kFloat64, DataType::kInt8,     DataType::kUInt8,
                              DataType::kInt32,   DataType::kInt64};
const ReduceOp kAllOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax,
                            ReduceOp::kProd};
const SimdLevel kAllLevels[] = {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512};
const size_t kCounts[] = {0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 65, 1000, 4097, 1 << 16};

class Report {
 public:
  void fail(const std::string& what) {
    if (failures_ < 50) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures_;
  }
  void check(bool ok, const std::string& what) {
    ++checks_;
    if (!ok) fail(what);
  }
  int failures() const { return failures_; }
  int checks() const { return checks_; }

 private:
  int failures_ = 0;
  int checks_ = 0;
};

std::string describe(DataType dtype, ReduceOp op, SimdLevel level, size_t count) {
  return std::string(to_string(dtype)) + " " + to_string(op) + " " + to_string(level) +
         " count=" + std::to_string(count);
}

template <class T>
T from_bits(uint64_t bits) {
  T x;
  std::memcpy(&x, &bits, sizeof x);  // little-endian: the low bytes
  return x;
}

template <class T>
uint64_t to_bits(T x) {
  uint64_t bits = 0;
  std::memcpy(&bits, &x, sizeof x);
  return bits;
}

// Bit patterns worth having in every test: zeros, infinities, NaNs with payloads (quiet and
// signalling, both signs), subnormals, extremes, and values whose sums overflow.
std::vector<uint64_t> special_bits(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat16:
      return {0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFD55, 0x7FFF,
              0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00, 0x7800};
    case DataType::kBFloat16:
      return {0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFA5, 0x7FFF,
              0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80, 0x7F00};
    case DataType::kFloat32: {
      using L = std::numeric_limits<float>;
      return {to_bits(0.0f), to_bits(-0.0f), to_bits(L::infinity()), to_bits(-L::infinity()),
              to_bits(L::quiet_NaN()), to_bits(-L::quiet_NaN()), to_bits(L::signaling_NaN()),
              0x7F800001, 0xFFA5A5A5, 0x7FFFFFFF, to_bits(L::denorm_min()),
              to_bits(-L::denorm_min()), 0x007FFFFF, to_bits(L::min()), to_bits(L::max()),
              to_bits(L::lowest()), to_bits(1.0f), to_bits(3e38f), to_bits(-3e38f)};
    }
    case DataType::kFloat64: {
      using L = std::numeric_limits<double>;
      return {to_bits(0.0), to_bits(-0.0), to_bits(L::infinity()), to_bits(-L::infinity()),
              to_bits(L::quiet_NaN()), to_bits(-L::quiet_NaN()), to_bits(L::signaling_NaN()),
              0x7FF0000000000001, 0xFFFA5A5A5A5A5A5A, 0x7FFFFFFFFFFFFFFF,
              to_bits(L::denorm_min()), to_bits(-L::denorm_min()), 0x000FFFFFFFFFFFFF,
              to_bits(L::min()), to_bits(L::max()), to_bits(L::lowest()), to_bits(1.0),
              to_bits(1.7e308), to_bits(-1.7e308)};
    }
    case DataType::kInt8:
    case DataType::kUInt8:
      return {0x00, 0x01, 0x7F, 0x80, 0xFF, 0x81, 0x10};
    case DataType::kInt32:
      return {0x0, 0x1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000};
    case DataType::kInt64:
      return {0x0, 0x1, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF, 0x100000000};
  }
  return {};
}

/*
 * One element's random bits: a special value 1 time in 8, else, for floating types, half the
 * time a random bit pattern (every class of value, mostly far apart in magnitude) and half
 * the time a value in [-64, 64) (so that sums and products round and carry). Elements are
 * written little-endian at `element * size` into `out`.
 */
std::vector<uint8_t> random_elements(DataType dtype, size_t count, std::mt19937_64& rng) {
  const size_t size = element_size(dtype);
  const std::vector<uint64_t> specials = special_bits(dtype);
  std::uniform_real_distribution<double> moderate(-64.0, 64.0);
  std::vector<uint8_t> out(count * size);
  for (size_t i = 0; i < count; ++i) {
    uint64_t bits = rng();
    if (rng() % 8 == 0) {
      bits = specials[rng() % specials.size()];
    } else if (is_floating(dtype) && rng() % 2 == 0) {
      const double x = moderate(rng);
      switch (dtype) {
        case DataType::kFloat64: bits = to_bits(x); break;
        case DataType::kFloat32: bits = to_bits(static_cast<float>(x)); break;
        case DataType::kBFloat16: bits = to_bits(static_cast<float>(x)) >> 16; break;
        default: {  // float16: a random 11-bit significand at a small exponent
          const uint64_t sign = rng() & 0x8000;
          bits = sign | ((10 + rng() % 12) << 10) | (rng() & 0x3FF);
        }
      }
    }
    std::memcpy(&out[i * size], &bits, size);
  }
  return out;
}

// Runs one level on copies of dst placed at the given byte offsets; returns dst's bytes.
std::vector<uint8_t> run_reduce(const std::vector<uint8_t>& dst, const std::vector<uint8_t>& src,
                                size_t count, DataType dtype, ReduceOp op, SimdLevel level,
                                size_t dst_offset, size_t src_offset) {
  const size_t bytes = count * element_size(dtype);
  std::vector<uint8_t> d(bytes + dst_offset), s(bytes + src_offset);
  if (bytes > 0) {
    std::memcpy(d.data() + dst_offset, dst.data(), bytes);
    std::memcpy(s.data() + src_offset, src.data(), bytes);
  }
  reduce_into(d.data() + dst_offset, s.data() + src_offset, count, dtype, op, level);
  return std::vector<uint8_t>(d.begin() + dst_offset, d.end());
}

std::vector<uint8_t> run_divide(const std::vector<uint8_t>& data, size_t count, DataType dtype,
                                double divisor, SimdLevel level, size_t offset) {
  const size_t bytes = count * element_size(dtype);
  std::vector<uint8_t> d(bytes + offset);
  if (bytes > 0) std::memcpy(d.data() + offset, data.data(), bytes);
  divide(d.data() + offset, count, dtype, divisor, level);
  return std::vector<uint8_t>(d.begin() + offset, d.end());
}

// The first element at which two results differ, or -1.
long first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                      size_t size) {
  for (size_t i = 0; i < a.size(); i += size) {
    if (std::memcmp(&a[i], &b[i], size) != 0) return static_cast<long>(i / size);
  }
  return -1;
}

std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> levels;
  for (SimdLevel level : kAllLevels) {
    if (simd_level_supported(level)) levels.push_back(level);
  }
  return levels;
}

// Byte offsets of dst and src: aligned, one element off, one byte off (for both or either).
std::vector<std::pair<size_t, size_t>> offsets(DataType dtype) {
  const size_t size = element_size(dtype);
  std::vector<std::pair<size_t, size_t>> out = {{0, 0}, {size, size}, {0, size}};
  if (size > 1) out.insert(out.end(), {{1, 1}, {1, 0}, {0, 3}});
  return out;
}

void test_levels_match_scalar(Report& report, std::mt19937_64& rng) {
  for (SimdLevel level : supported_levels()) {
    if (level == SimdLevel::kScalar) continue;
    for (DataType dtype : kAllTypes) {
      const size_t size = element_size(dtype);
      for (ReduceOp op : kAllOps) {
        for (size_t count : kCounts) {
          const auto dst = random_elements(dtype, count, rng);
          const auto src = random_elements(dtype, count, rng);
          for (auto [dst_offset, src_offset] : offsets(dtype)) {
            const auto want =
                run_reduce(dst, src, count, dtype, op, SimdLevel::kScalar, dst_offset, src_offset);
            const auto got = run_reduce(dst, src, count, dtype, op, level, dst_offset, src_offset);
            const long at = first_difference(want, got, size);
            report.check(at < 0, describe(dtype, op, level, count) + " offsets " +
                                     std::to_string(dst_offset) + "/" +
                                     std::to_string(src_offset) + ": differs from scalar at " +
                                     std::to_string(at));
          }
        }
      }
      if (!is_floating(dtype)) continue;
      for (double divisor : {3.0, 0.1, -7.0, 1e-30, 0.0, -0.0, 1e300, std::nan("")}) {
        for (size_t count : kCounts) {
          const auto data = random_elements(dtype, count, rng);
          for (size_t offset : {size_t{0}, size, size_t{1}}) {
            const auto want = run_divide(data, count, dtype, divisor, SimdLevel::kScalar, offset);
            const auto got = run_divide(data, count, dtype, divisor, level, offset);
            const long at = first_difference(want, got, size);
            report.check(at < 0, std::string(to_string(dtype)) + " divide by " +
                                     std::to_string(divisor) + " " + to_string(level) +
                                     " count=" + std::to_string(count) +
                                     ": differs from scalar at " + std::to_string(at));
          }
        }
      }
    }
  }
}

// ---- Independent references for the scalar level ------------------------------------------

// A 16-bit float format: its value for each bit pattern, the largest finite pattern, and the
// value the pattern after it (inf) stands for when rounding (the next power of two).
struct HalfFormat {
  std::function<double(uint16_t)> value;
  uint16_t max_finite;
  double overflow;
  uint16_t quiet_bit;
};

// float16 from its definition, with ldexp: (1024 + mantissa) * 2^(exponent - 25), or
// mantissa * 2^-24 when the exponent field is 0.
double float16_value(uint16_t h) {
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  double v;
  if (exp == 0x1F) {
    v = mant ? std::nan("") : std::numeric_limits<double>::infinity();
  } else {
    v = exp ? std::ldexp(1024 + mant, exp - 25) : std::ldexp(mant, -24);
  }
  return (h & 0x8000) ? -v : v;
}

double bfloat16_value(uint16_t h) { return from_bits<float>(static_cast<uint64_t>(h) << 16); }

const HalfFormat kFloat16Format{float16_value, 0x7BFF, 65536.0, 0x200};
const HalfFormat kBFloat16Format{bfloat16_value, 0x7F7F, std::ldexp(1.0, 128), 0x40};

template <class T>
bool is_nan_value(T x) {
  return x != x;
}

/*
 * Round x to the format, to nearest, ties to even, without any of the kernels' bit
 * tricks: positive patterns 0..max_finite are ordered like their values, so binary-search the
 * largest one not above |x|, then pick it or its successor (inf beyond max_finite, standing
 * for `overflow`) by comparing with their midpoint, which double holds exactly.
 */
uint16_t reference_round(double x, const HalfFormat& format) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const uint16_t inf = static_cast<uint16_t>(format.max_finite + 1);
  // A NaN made by the operation (inf - inf, 0 * inf): the platform's default NaN, whose
  // payload is empty in double and float alike.
  if (is_nan_value(x)) return sign | inf | format.quiet_bit;
  const double a = std::fabs(x);
  if (a >= format.overflow) return sign | inf;
  uint32_t lo = 0, hi = format.max_finite;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) / 2;
    if (format.value(static_cast<uint16_t>(mid)) <= a) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const double below = format.value(static_cast<uint16_t>(lo));
  const double above =
      lo == format.max_finite ? format.overflow : format.value(static_cast<uint16_t>(lo + 1));
  const double midpoint = (below + above) / 2;
  uint32_t pick = lo;
  if (a > midpoint || (a == midpoint && (lo & 1))) pick = lo + 1;
  return static_cast<uint16_t>(sign | pick);
}

// min/max as the kernels define them: on a tie the destination's value stays.
template <class T>
bool takes_src(ReduceOp op, T a, T b) {
  return op == ReduceOp::kMin ? b < a : b > a;
}

// Expected bits of one element for float16/bfloat16. Sums and products of two 16-bit floats
// are exact in double for float16; for bfloat16 double's rounding is innocuous (53 >= 2*8+2),
// so rounding the double result once is the correctly rounded answer either way.
uint16_t expected_half(uint16_t a, uint16_t b, ReduceOp op, const HalfFormat& format) {
  const double x = format.value(a), y = format.value(b);
  if (is_nan_value(x)) return a | format.quiet_bit;
  if (is_nan_value(y)) return b | format.quiet_bit;
  switch (op) {
    case ReduceOp::kMin:
    case ReduceOp::kMax: return takes_src(op, x, y) ? b : a;
    case ReduceOp::kProd: return reference_round(x * y, format);
    default: return reference_round(x + y, format);
  }
}

template <class F>
F expected_float(F a, F b, ReduceOp op) {
  if (is_nan_value(a)) return a;
  if (is_nan_value(b)) return b;
  switch (op) {
    case ReduceOp::kMin:
    case ReduceOp::kMax: return takes_src(op, a, b) ? b : a;
    case ReduceOp::kProd: return a * b;
    default: return a + b;
  }
}

// Integers: the exact result in 128 bits, wrapped to T's width.
template <class T>
T expected_integer(T a, T b, ReduceOp op) {
  const __int128 x = a, y = b;
  switch (op) {
    case ReduceOp::kMin: return static_cast<T>(x < y ? x : y);
    case ReduceOp::kMax: return static_cast<T>(x > y ? x : y);
    case ReduceOp::kProd: return static_cast<T>(static_cast<uint64_t>(x * y));
    default: return static_cast<T>(static_cast<uint64_t>(x + y));
  }
}

uint64_t expected_bits(DataType dtype, uint64_t a, uint64_t b, ReduceOp op) {
  switch (dtype) {
    case DataType::kFloat16:
      return expected_half(static_cast<uint16_t>(a), static_cast<uint16_t>(b), op, kFloat16Format);
    case DataType::kBFloat16:
      return expected_half(static_cast<uint16_t>(a), static_cast<uint16_t>(b), op,
                           kBFloat16Format);
    case DataType::kFloat32:
      return to_bits(expected_float(from_bits<float>(a), from_bits<float>(b), op));
    case DataType::kFloat64:
      return to_bits(expected_float(from_bits<double>(a), from_bits<double>(b), op));
    case DataType::kInt8:
      return to_bits(expected_integer(from_bits<int8_t>(a), from_bits<int8_t>(b), op));
    case DataType::kUInt8:
      return to_bits(expected_integer(from_bits<uint8_t>(a), from_bits<uint8_t>(b), op));
    case DataType::kInt32:
      return to_bits(expected_integer(from_bits<int32_t>(a), from_bits<int32_t>(b), op));
    case DataType::kInt64:
      return to_bits(expected_integer(from_bits<int64_t>(a), from_bits<int64_t>(b), op));
  }
  return 0;
}

uint64_t element_bits(const std::vector<uint8_t>& bytes, size_t i, size_t size) {
  uint64_t bits = 0;
  std::memcpy(&bits, &bytes[i * size], size);
  return bits;
}

void test_scalar_against_reference(Report& report, std::mt19937_64& rng) {
  const size_t count = 1 << 14;
  for (DataType dtype : kAllTypes) {
    const size_t size = element_size(dtype);
    for (ReduceOp op : kAllOps) {
      const auto dst = random_elements(dtype, count, rng);
      const auto src = random_elements(dtype, count, rng);
      const auto got = run_reduce(dst, src, count, dtype, op, SimdLevel::kScalar, 0, 0);
      size_t wrong = 0;
      char first[160] = "";
      for (size_t i = 0; i < count; ++i) {
        const uint64_t a = element_bits(dst, i, size), b = element_bits(src, i, size);
        const uint64_t want = expected_bits(dtype, a, b, op), have = element_bits(got, i, size);
        if (want != have && wrong++ == 0) {
          std::snprintf(first, sizeof first, ": %#llx op %#llx = %#llx, want %#llx",
                        static_cast<unsigned long long>(a), static_cast<unsigned long long>(b),
                        static_cast<unsigned long long>(have),
                        static_cast<unsigned long long>(want));
        }
      }
      report.check(wrong == 0, std::string(to_string(dtype)) + " " + to_string(op) +
                                   " scalar vs reference, " + std::to_string(wrong) +
                                   " wrong" + first);
    }
  }
}

// Division: float32 divides by the divisor as a float, float16 rounds the exact-enough double
// quotient of the value by that float once (double rounding via double is innocuous).
void test_divide_reference(Report& report, std::mt19937_64& rng) {
  const size_t count = 4096;
  for (double divisor : {3.0, 10.0, 0.37, -1e-6}) {
    const float fdiv = static_cast<float>(divisor);
    const auto f32 = random_elements(DataType::kFloat32, count, rng);
    const auto f32_got = run_divide(f32, count, DataType::kFloat32, divisor, SimdLevel::kScalar, 0);
    const auto f16 = random_elements(DataType::kFloat16, count, rng);
    const auto f16_got = run_divide(f16, count, DataType::kFloat16, divisor, SimdLevel::kScalar, 0);
    for (size_t i = 0; i < count; ++i) {
      const float x = from_bits<float>(element_bits(f32, i, 4));
      const float y = from_bits<float>(element_bits(f32_got, i, 4));
      const float want = x / fdiv;
      report.check(to_bits(y) == to_bits(want) || (is_nan_value(y) && is_nan_value(want)),
                   "float32 divide by " + std::to_string(divisor) + " at " + std::to_string(i));
      const uint16_t h = static_cast<uint16_t>(element_bits(f16, i, 2));
      const double hv = float16_value(h);
      const uint16_t h_want =
          is_nan_value(hv) ? (h | 0x200) : reference_round(hv / fdiv, kFloat16Format);
      report.check(element_bits(f16_got, i, 2) == h_want,
                   "float16 divide by " + std::to_string(divisor) + " at " + std::to_string(i));
    }
  }
}

// Every 16-bit pattern plus -0 comes back unchanged (NaN: quieted), at every level: the
// widening and narrowing conversions round-trip.
void test_half_round_trip(Report& report) {
  for (DataType dtype : {DataType::kFloat16, DataType::kBFloat16}) {
    const HalfFormat& format = dtype == DataType::kFloat16 ? kFloat16Format : kBFloat16Format;
    std::vector<uint16_t> data(65536), minus_zero(65536, 0x8000);
    for (SimdLevel level : supported_levels()) {
      for (uint32_t i = 0; i < 65536; ++i) data[i] = static_cast<uint16_t>(i);
      reduce_into(data.data(), minus_zero.data(), data.size(), dtype, ReduceOp::kSum, level);
      for (uint32_t i = 0; i < 65536; ++i) {
        const uint16_t h = static_cast<uint16_t>(i);
        const uint16_t want = is_nan_value(format.value(h)) ? (h | format.quiet_bit) : h;
        report.check(data[i] == want, std::string(to_string(dtype)) + " round trip of " +
                                          std::to_string(i) + " at " + to_string(level));
      }
    }
  }
}

// Specific NaN and signed-zero cases, spelled out (the random tests cover them statistically).
void test_nan_and_zero_rules(Report& report) {
  const float qnan = from_bits<float>(0x7FC00001), snan = from_bits<float>(0xFF800002);
  for (SimdLevel level : supported_levels()) {
    for (ReduceOp op : kAllOps) {
      // 19 elements: a full vector at every level and a scalar tail.
      std::vector<float> a(19, qnan), b(19, snan);
      reduce_into(a.data(), b.data(), a.size(), DataType::kFloat32, op, level);
      for (float x : a) report.check(to_bits(x) == 0x7FC00001, "dst NaN wins");
      std::vector<float> c(19, 1.0f);
      reduce_into(c.data(), b.data(), c.size(), DataType::kFloat32, op, level);
      for (float x : c) report.check(to_bits(x) == 0xFF800002, "src NaN passes");
    }
    std::vector<float> pz(19, 0.0f), nz(19, -0.0f);
    reduce_into(pz.data(), nz.data(), pz.size(), DataType::kFloat32, ReduceOp::kMin, level);
    for (float x : pz) report.check(to_bits(x) == 0, "min(+0, -0) keeps +0");
    reduce_into(nz.data(), pz.data(), nz.size(), DataType::kFloat32, ReduceOp::kMax, level);
    for (float x : nz) report.check(to_bits(x) == 0x80000000u, "max(-0, +0) keeps -0");
  }
}

template <class F>
bool throws_invalid_argument(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_errors(Report& report) {
  int32_t ints[4] = {1, 2, 3, 4};
  float floats[4] = {1, 2, 3, 4};
  report.check(simd_level_supported(SimdLevel::kScalar), "scalar is always supported");
  report.check(simd_level_supported(best_simd_level()), "best level is supported");
  for (SimdLevel level : kAllLevels) {
    const bool supported = simd_level_supported(level);
    report.check(supported == (static_cast<int>(level) <= static_cast<int>(best_simd_level())),
                 std::string("levels are nested: ") + to_string(level));
    report.check(throws_invalid_argument([&] {
                   reduce_into(floats, floats, 4, DataType::kFloat32, ReduceOp::kSum, level);
                 }) == !supported,
                 std::string("reduce_into throws exactly when unsupported: ") + to_string(level));
    report.check(throws_invalid_argument([&] {
                   divide(floats, 4, DataType::kFloat32, 2.0, level);
                 }) == !supported,
                 std::string("divide throws exactly when unsupported: ") + to_string(level));
    if (!supported) continue;
    for (DataType dtype : kAllTypes) {
      if (is_floating(dtype)) continue;
      report.check(throws_invalid_argument([&] { divide(ints, 1, dtype, 2.0, level); }),
                   std::string("integer divide throws: ") + to_string(dtype));
    }
    report.check(throws_invalid_argument([&] {
                   reduce_into(ints, ints, 4, static_cast<DataType>(42), ReduceOp::kSum, level);
                 }),
                 "unknown dtype throws");
    report.check(throws_invalid_argument([&] {
                   reduce_into(ints, ints, 4, DataType::kInt32, static_cast<ReduceOp>(42), level);
                 }),
                 "unknown op throws");
    // count 0 touches nothing, so null pointers are fine.
    reduce_into(nullptr, nullptr, 0, DataType::kFloat32, ReduceOp::kSum, level);
    divide(nullptr, 0, DataType::kFloat16, 2.0, level);
  }
  report.check(throws_invalid_argument([&] {
                 reduce_into(floats, floats, 4, DataType::kFloat32, ReduceOp::kSum,
                             static_cast<SimdLevel>(9));
               }),
               "unknown level throws");
  report.check(std::string(to_string(SimdLevel::kScalar)) == "scalar" &&
                   std::string(to_string(SimdLevel::kAvx2)) == "avx2" &&
                   std::string(to_string(SimdLevel::kAvx512)) == "avx512",
               "level names");
}

}  // namespace
}  // namespace collectives

int main() {
  using namespace collectives;
  Report report;
  std::mt19937_64 rng(20261107);
  std::printf("best SIMD level: %s\n", to_string(best_simd_level()));
  for (SimdLevel level : kAllLevels) {
    if (!simd_level_supported(level)) {
      std::printf("SKIP %s: not supported by this CPU or build\n", to_string(level));
    }
  }
  test_errors(report);
  test_nan_and_zero_rules(report);
  test_half_round_trip(report);
  test_scalar_against_reference(report, rng);
  test_divide_reference(report, rng);
  test_levels_match_scalar(report, rng);
  std::printf("%d checks, %d failures\n", report.checks(), report.failures());
  return report.failures() == 0 ? 0 : 1;
}
