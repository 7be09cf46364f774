#pragma once

#include <pybind11/pybind11.h>

namespace collectives {

// _core.cuda: the CUDA kernels and copies on raw device addresses, where they are built.
void bind_cuda(pybind11::module_& m);

}  // namespace collectives
