// Python face of the reduction kernels: the private submodule collectives._core.kernels,
// used by tests and benchmarks to run one SIMD level on raw buffers.
#pragma once

#include <pybind11/pybind11.h>

namespace collectives {

void bind_kernels(pybind11::module_& m);

}  // namespace collectives
