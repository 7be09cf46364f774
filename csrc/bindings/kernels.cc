#include "bindings/kernels.h"
#include "bindings/gil.h"

#include <cstdint>
#include <string>

#include "common/types.h"
#include "kernels/reduce.h"

namespace py = pybind11;

namespace collectives {
namespace {

// The enum value whose to_string() is `name`; ValueError listing the valid names otherwise.
template <class Enum>
Enum parse_name(const std::string& name, int count, const char* kind) {
  std::string known;
  for (int i = 0; i < count; ++i) {
    const Enum value = static_cast<Enum>(i);
    if (name == to_string(value)) return value;
    known += (i ? ", " : "") + std::string(to_string(value));
  }
  throw py::value_error("unknown " + std::string(kind) + " '" + name + "' (one of: " + known +
                        ")");
}

void* address_of(uintptr_t address, uint64_t count) {
  if (address == 0 && count > 0) throw py::value_error("null address with a nonzero count");
  return reinterpret_cast<void*>(address);
}

}  // namespace

void bind_kernels(py::module_& m) {
  py::module_ k = m.def_submodule(
      "kernels", "Reduction kernels on raw addresses (private: for tests and benchmarks).");

  k.def(
      "levels",
      [] {
        py::list names;
        for (int i = 0; i < kNumSimdLevels; ++i) {
          const auto level = static_cast<SimdLevel>(i);
          if (simd_level_supported(level)) names.append(to_string(level));
        }
        return names;
      },
      "Names of the SIMD levels this CPU and build support, lowest first.");

  k.def(
      "best_level", [] { return std::string(to_string(best_simd_level())); },
      "Name of the SIMD level reduce_into uses by default.");

  // The caller owns the buffers and keeps them alive; the kernel runs without the GIL.
  k.def(
      "reduce_into",
      [](uintptr_t dst, uintptr_t src, uint64_t count, const std::string& dtype,
         const std::string& op, const std::string& level) {
        const auto t = parse_name<DataType>(dtype, kNumDataTypes, "dtype");
        const auto o = parse_name<ReduceOp>(op, kNumReduceOps, "reduce op");
        const auto l = parse_name<SimdLevel>(level, kNumSimdLevels, "SIMD level");
        void* d = address_of(dst, count);
        const void* s = address_of(src, count);
        ReleasedGil release;
        reduce_into(d, s, count, t, o, l);
      },
      py::arg("dst_address"), py::arg("src_address"), py::arg("count"), py::arg("dtype"),
      py::arg("op"), py::arg("level"),
      "dst[i] = dst[i] (op) src[i] for count elements at the given addresses.");

  k.def(
      "divide",
      [](uintptr_t address, uint64_t count, const std::string& dtype, double divisor,
         const std::string& level) {
        const auto t = parse_name<DataType>(dtype, kNumDataTypes, "dtype");
        const auto l = parse_name<SimdLevel>(level, kNumSimdLevels, "SIMD level");
        void* d = address_of(address, count);
        ReleasedGil release;
        divide(d, count, t, divisor, l);
      },
      py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("divisor"),
      py::arg("level"), "data[i] /= divisor for count floating elements at address.");
}

}  // namespace collectives
