// widen() and narrow(): plain loops over the scalar conversions of half.h. They run once per
// contribution on the reduction server, whose inputs arrive at link speed, far below these
// loops' rate, so one version serves every SIMD level.
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/half.h"
#include "kernels/reduce.h"

namespace collectives {
namespace {

template <class Half>
void widen_typed(float* dst, const void* src, size_t count) {
  const char* bytes = static_cast<const char*>(src);
  for (size_t i = 0; i < count; ++i) {
    Half x;
    std::memcpy(&x, bytes + i * sizeof(Half), sizeof(Half));
    dst[i] = kernels::widen(x);
  }
}

template <class Half, Half (*kNarrow)(float)>
void narrow_typed(void* dst, const float* src, size_t count) {
  char* bytes = static_cast<char*>(dst);
  for (size_t i = 0; i < count; ++i) {
    const Half x = kNarrow(src[i]);
    std::memcpy(bytes + i * sizeof(Half), &x, sizeof(Half));
  }
}

std::invalid_argument not_half(DataType dtype) {
  return std::invalid_argument(std::string("float32 conversions are for float16 and bfloat16, not ") +
                               to_string(dtype));
}

}  // namespace

void widen(float* dst, const void* src, size_t count, DataType dtype) {
  switch (dtype) {
    case DataType::kFloat16: return widen_typed<kernels::Float16>(dst, src, count);
    case DataType::kBFloat16: return widen_typed<kernels::BFloat16>(dst, src, count);
    default: throw not_half(dtype);
  }
}

void narrow(void* dst, const float* src, size_t count, DataType dtype) {
  switch (dtype) {
    case DataType::kFloat16:
      return narrow_typed<kernels::Float16, kernels::narrow_to_float16>(dst, src, count);
    case DataType::kBFloat16:
      return narrow_typed<kernels::BFloat16, kernels::narrow_to_bfloat16>(dst, src, count);
    default: throw not_half(dtype);
  }
}

}  // namespace collectives
