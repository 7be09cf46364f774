#include "common/types.h"

#include <stdexcept>
#include <string>

namespace collectives {

size_t element_size(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat16:
    case DataType::kBFloat16:
      return 2;
    case DataType::kFloat32:
    case DataType::kInt32:
      return 4;
    case DataType::kFloat64:
    case DataType::kInt64:
      return 8;
    case DataType::kInt8:
    case DataType::kUInt8:
      return 1;
  }
  throw std::invalid_argument("unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

bool is_floating(DataType dtype) {
  return dtype == DataType::kFloat16 || dtype == DataType::kBFloat16 ||
         dtype == DataType::kFloat32 || dtype == DataType::kFloat64;
}

const char* to_string(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat16: return "float16";
    case DataType::kBFloat16: return "bfloat16";
    case DataType::kFloat32: return "float32";
    case DataType::kFloat64: return "float64";
    case DataType::kInt8: return "int8";
    case DataType::kUInt8: return "uint8";
    case DataType::kInt32: return "int32";
    case DataType::kInt64: return "int64";
  }
  return "unknown-dtype";
}

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kProd: return "prod";
  }
  return "unknown-op";
}

DataType checked_dtype(int value) {
  if (value < 0 || value >= kNumDataTypes) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(value));
  }
  return static_cast<DataType>(value);
}

ReduceOp checked_op(int value) {
  if (value < 0 || value >= kNumReduceOps) {
    throw std::invalid_argument("unknown reduce op code " + std::to_string(value));
  }
  return static_cast<ReduceOp>(value);
}

void check_reducible(DataType dtype, ReduceOp op) {
  if (op == ReduceOp::kAvg && !is_floating(dtype)) {
    throw std::invalid_argument(std::string("op 'avg' needs a floating dtype, not ") + to_string(dtype) +
                                ": use 'sum' and divide");
  }
}

}  // namespace collectives
