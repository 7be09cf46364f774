// Reading a DLPack capsule (torch, JAX, CuPy ... tensors) into what the communicator needs.
#pragma once

#include <pybind11/pybind11.h>

namespace collectives {

// Adds _core.dlpack_info(capsule) -> (address, count, dtype_code, device_type, contiguous,
// owner): keep `owner` alive while the memory is in use.
void bind_buffers(pybind11::module_& m);

}  // namespace collectives
