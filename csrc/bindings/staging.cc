#include "bindings/staging.h"
#include "bindings/gil.h"

#include <cstdint>
#include <memory>

#include "common/types.h"
#include "communicator.h"
#include "staging/host_copy_engine.h"
#include "staging/staged_allreduce.h"
#ifdef COLLECTIVES_HAVE_CUDA
#include "kernels/cuda/cuda_copy_engine.h"
#endif

namespace py = pybind11;

namespace collectives {

void bind_staging(py::module_& m) {
  py::class_<StagedAllreduce, std::shared_ptr<StagedAllreduce>>(
      m, "StagedAllreduce",
      "All-reduces of buffers the host cannot reduce in place, staged piece by piece through a few host slots "
      "(staging/staged_allreduce.h). Close it after its communicator.")
      .def_static(
          "cuda",
          [](int device, size_t piece_bytes, size_t slots) {
#ifdef COLLECTIVES_HAVE_CUDA
            return std::make_shared<StagedAllreduce>(make_cuda_copy_engine(device), piece_bytes, slots);
#else
            (void)device, (void)piece_bytes, (void)slots;
            throw CollectiveError("this build has no CUDA path (no nvcc when it was built)");
            return std::shared_ptr<StagedAllreduce>();
#endif
          },
          py::arg("device"), py::arg("piece_bytes"), py::arg("slots"),
          "Buffers on GPU `device`, through pinned host slots, copied on a CUDA stream of their own.")
      .def_static(
          "host",
          [](size_t piece_bytes, size_t slots) {
            return std::make_shared<StagedAllreduce>(std::make_unique<HostCopyEngine>(), piece_bytes, slots);
          },
          py::arg("piece_bytes"), py::arg("slots"),
          "Host buffers through host slots, copied by memcpy on a thread: the same schedule as CUDA's, for the "
          "tests of a machine without a GPU.")
      .def(
          "allreduce",
          [](StagedAllreduce& staging, Communicator& comm, uintptr_t data, size_t count, int dtype, int op) {
            const DataType type = checked_dtype(dtype);
            const ReduceOp reduce_op = checked_op(op);
            ReleasedGil release;
            return staging.allreduce(comm, reinterpret_cast<void*>(data), count, type, reduce_op);
          },
          py::arg("comm"), py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          "Queues the staged all-reduce on `comm` and returns its Work at once.")
      .def("close", &StagedAllreduce::close, py::call_guard<ReleasedGil>(),
           "Waits for the calls in flight, then frees the host slots.");
}

}  // namespace collectives
