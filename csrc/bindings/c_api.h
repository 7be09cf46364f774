// collectives' C API (collectives/include/collectives/c_api.h) over the core's Communicator.
#pragma once

#include <pybind11/pybind11.h>

namespace collectives {

// Adds _core.C_API_ADDRESS (the table's address) and C_API_VERSION.
void bind_c_api(pybind11::module_& m);

}  // namespace collectives
