// The compiled core as seen from Python (collectives._core). Buffers arrive as addresses and
// element counts: collectives/_buffers.py turns arrays and tensors into those, and keeps the
// objects alive until their collective is done. Every call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/buffers.h"
#include "bindings/kernels.h"
#include "communicator.h"
#include "kernels/reduce.h"
#include "transport/frame.h"

namespace py = pybind11;
using namespace collectives;

namespace {

void* as_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "collectives: the compiled data plane";
  m.attr("PROTOCOL_VERSION") = kProtocolVersion;
  m.attr("DTYPES") = py::make_tuple("float16", "bfloat16", "float32", "float64", "int8",
                                    "uint8", "int32", "int64");  // index = DataType code
  m.attr("OPS") = py::make_tuple("sum", "avg", "min", "max", "prod");  // index = ReduceOp code
  m.attr("SIMD_LEVEL") = to_string(best_simd_level());

  // Held for the life of the process on purpose: a static py::object would be destroyed
  // after the interpreter is gone.
  py::module_ errors = py::module_::import("collectives.errors");
  static PyObject* collective_error = py::object(errors.attr("CollectiveError")).release().ptr();
  static PyObject* timeout_error = py::object(errors.attr("TimeoutError")).release().ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TimeoutError& e) {
      PyErr_SetString(timeout_error, e.what());
    } catch (const CollectiveError& e) {
      PyErr_SetString(collective_error, e.what());
    }
  });

  bind_buffers(m);
  bind_kernels(m);

  py::class_<Work, std::shared_ptr<Work>>(m, "Work")
      .def("wait_for", &Work::wait_for, py::arg("seconds"),
           py::call_guard<py::gil_scoped_release>(),
           "True once finished (raising its error); False if `seconds` passed first.")
      .def("done", &Work::done, py::call_guard<py::gil_scoped_release>());

  py::class_<CommunicatorOptions>(m, "Options")
      .def(py::init<>())
      .def_readwrite("timeout_seconds", &CommunicatorOptions::timeout_seconds)
      .def_readwrite("segment_bytes", &CommunicatorOptions::segment_bytes)
      .def_readwrite("debug", &CommunicatorOptions::debug);

  py::class_<Communicator>(m, "Communicator")
      .def(py::init<int, int, std::vector<std::vector<int>>, std::vector<std::string>,
                    CommunicatorOptions>(),
           py::arg("rank"), py::arg("size"), py::arg("peer_fds"), py::arg("peer_names"),
           py::arg("options"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def(
          "allreduce",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int op) {
            return c.allreduce(as_pointer(data), count, checked_dtype(dtype), checked_op(op));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "allgather",
          [](Communicator& c, uintptr_t input, uintptr_t output, size_t count, int dtype) {
            return c.allgather(as_pointer(input), as_pointer(output), count, checked_dtype(dtype));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "broadcast",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int root) {
            return c.broadcast(as_pointer(data), count, checked_dtype(dtype), root);
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "reduce_scatter",
          [](Communicator& c, uintptr_t input, uintptr_t output, size_t count, int dtype, int op) {
            return c.reduce_scatter(as_pointer(input), as_pointer(output), count,
                                    checked_dtype(dtype), checked_op(op));
          },
          py::call_guard<py::gil_scoped_release>())
      .def("barrier", &Communicator::barrier, py::call_guard<py::gil_scoped_release>())
      .def("abort", &Communicator::abort, py::arg("reason"),
           py::call_guard<py::gil_scoped_release>())
      .def("close", &Communicator::close, py::call_guard<py::gil_scoped_release>());
}
