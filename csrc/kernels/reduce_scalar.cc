// The reference level: plain C++ on one element at a time. Built with -fno-tree-vectorize so
// that it stays the scalar yardstick the SIMD levels are tested against.
#include "kernels/levels.h"
#include "kernels/reduce_impl.h"

namespace collectives {
namespace kernels {
namespace scalar {

void reduce_into(void* dst, const void* src, size_t count, DataType dtype, ReduceOp op) {
  reduce_with<Scalar>(dst, src, count, dtype, op);
}

void divide(void* data, size_t count, DataType dtype, double divisor) {
  divide_with<Scalar>(data, count, dtype, divisor);
}

}  // namespace scalar
}  // namespace kernels
}  // namespace collectives
