#include "bindings/cuda.h"
#include "bindings/gil.h"

#include <cstdint>
#include <string>

#include "common/types.h"

#ifdef COLLECTIVES_HAVE_CUDA
#include "kernels/cuda/cuda_copy_engine.h"
#include "kernels/cuda/reduce_cuda.h"
#endif

namespace py = pybind11;

namespace collectives {

void bind_cuda(py::module_& m) {
  py::module_ c = m.def_submodule("cuda", "CUDA kernels on raw device addresses (private: for the device path and "
                                          "tests/gpu).");
#ifdef COLLECTIVES_HAVE_CUDA
  c.attr("BUILT") = true;
  c.def("devices", &cuda_devices, "GPUs this process can use; 0 without a driver or a device.");
  c.def("runtime_version", &cuda_runtime_version, "The CUDA runtime linked in, as '13.0'.");
  c.def(
      "reduce_into",
      [](uintptr_t dst, uintptr_t src, uint64_t count, int dtype, int op) {
        ReleasedGil release;
        cuda_reduce_into(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), count,
                         checked_dtype(dtype), checked_op(op));
      },
      py::arg("dst_address"), py::arg("src_address"), py::arg("count"), py::arg("dtype"), py::arg("op"),
      "dst[i] = dst[i] (op) src[i] for count elements of device memory (dtype, op: codes of DTYPES, OPS).");
  c.def(
      "device_of",
      [](uintptr_t address) {
        ReleasedGil release;
        return cuda_device_of(reinterpret_cast<const void*>(address));
      },
      py::arg("address"), "The GPU that the device memory at address is on.");
#else
  c.attr("BUILT") = false;
#endif
}

}  // namespace collectives
