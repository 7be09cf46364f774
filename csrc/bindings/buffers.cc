#include "bindings/buffers.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/types.h"

namespace py = pybind11;

namespace collectives {

namespace {

// The DLPack ABI (dmlc/dlpack, v0.x "dltensor" capsules), declared from its specification.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

DataType dtype_from_dlpack(const DLDataType& t) {
  if (t.lanes == 1) {
    switch (t.code) {
      case 0:
        if (t.bits == 8) return DataType::kInt8;
        if (t.bits == 32) return DataType::kInt32;
        if (t.bits == 64) return DataType::kInt64;
        break;
      case 1:
        if (t.bits == 8) return DataType::kUInt8;
        break;
      case 2:
        if (t.bits == 16) return DataType::kFloat16;
        if (t.bits == 32) return DataType::kFloat32;
        if (t.bits == 64) return DataType::kFloat64;
        break;
      case 4:
        if (t.bits == 16) return DataType::kBFloat16;
        break;
    }
  }
  throw py::type_error("unsupported tensor dtype (DLPack code " + std::to_string(t.code) +
                       ", " + std::to_string(t.bits) + " bits): use float16, bfloat16, float32, "
                       "float64, int8, uint8, int32 or int64");
}

py::tuple dlpack_info(py::capsule capsule) {
  if (std::string(capsule.name()) != "dltensor") {
    throw py::value_error("expected an unused DLPack capsule named 'dltensor'");
  }
  auto* managed = static_cast<DLManagedTensor*>(capsule.get_pointer());
  const DLTensor& t = managed->dl_tensor;
  DataType dtype = dtype_from_dlpack(t.dtype);
  // Contiguous means row-major strides, where dimensions of extent 1 may have any stride.
  int64_t count = 1;
  bool contiguous = true;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.strides != nullptr && t.shape[d] != 1 && t.strides[d] != count) contiguous = false;
    count *= t.shape[d];
  }
  uintptr_t address = reinterpret_cast<uintptr_t>(t.data) + t.byte_offset;
  int device_type = t.device.device_type;
  // Consumed: the producer's capsule is marked used, and the memory is ours until the owner
  // returned here is released (the caller holds it until the collective is done), which
  // calls the producer's deleter as the DLPack protocol asks.
  capsule.set_name("used_dltensor");
  py::capsule owner(managed, [](void* p) {
    auto* tensor = static_cast<DLManagedTensor*>(p);
    if (tensor->deleter) tensor->deleter(tensor);
  });
  return py::make_tuple(address, count, static_cast<int>(dtype), device_type, contiguous, owner);
}

// Where an exporter of the buffer protocol keeps its memory, or None if it will not say so
// without a format (numpy dtypes from outside numpy, such as bfloat16): numpy builds a whole
// dict for __array_interface__, which costs a small collective more than its exchange.
py::object buffer_address(py::handle exporter) {
  Py_buffer view;
  if (PyObject_GetBuffer(exporter.ptr(), &view, PyBUF_ANY_CONTIGUOUS) != 0) {
    PyErr_Clear();
    return py::none();
  }
  const auto address = reinterpret_cast<uintptr_t>(view.buf);
  PyBuffer_Release(&view);
  return py::int_(address);
}

}  // namespace

void bind_buffers(py::module_& m) {
  m.def("buffer_address", &buffer_address, py::arg("exporter"),
        "The address of a contiguous buffer-protocol exporter's memory, or None.");
  m.def("dlpack_info", &dlpack_info, py::arg("capsule"),
        "(address, count, dtype_code, device_type, contiguous, owner) of a DLPack capsule, "
        "which it consumes; keep `owner` until the memory is no longer used.");
}

}  // namespace collectives
