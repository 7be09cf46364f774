// Element types and reduction operators understood by every layer of the core.
#pragma once

#include <cstddef>
#include <cstdint>

namespace collectives {

// Values travel on the wire (frame headers): append only, never renumber.
enum class DataType : uint8_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
  kInt8 = 4,
  kUInt8 = 5,
  kInt32 = 6,
  kInt64 = 7,
};
constexpr int kNumDataTypes = 8;

enum class ReduceOp : uint8_t {
  kSum = 0,
  kAvg = 1,  // reduced as a sum, then divided once by the number of ranks
  kMin = 2,
  kMax = 3,
  kProd = 4,
};
constexpr int kNumReduceOps = 5;

size_t element_size(DataType dtype);
bool is_floating(DataType dtype);
const char* to_string(DataType dtype);
const char* to_string(ReduceOp op);

// Throw std::invalid_argument on a value outside the enum (it came off the wire or from Python).
DataType checked_dtype(int value);
ReduceOp checked_op(int value);
// Throws std::invalid_argument where `op` cannot reduce elements of `dtype` (an average of
// integers): the one check of the Communicator's reductions, whichever entry queued them.
void check_reducible(DataType dtype, ReduceOp op);

}  // namespace collectives
