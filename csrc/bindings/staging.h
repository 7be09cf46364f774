#pragma once

#include <pybind11/pybind11.h>

namespace collectives {

// _core.StagedAllreduce: the staged all-reduce of device buffers (staging/staged_allreduce.h),
// through CUDA's copy engine where it is built, or through host memory (for the tests).
void bind_staging(pybind11::module_& m);

}  // namespace collectives
