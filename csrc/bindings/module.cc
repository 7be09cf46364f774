// The compiled core as seen from Python (collectives._core). Buffers arrive as addresses and
// element counts: collectives/_buffers.py turns arrays and tensors into those, and keeps the
// objects alive until their collective is done. Every call releases the GIL (a blocking one
// takes it back only to let Python handle signals).
#include <unistd.h>

#include <optional>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/buffers.h"
#include "bindings/c_api.h"
#include "bindings/cuda.h"
#include "bindings/gil.h"
#include "bindings/kernels.h"
#include "bindings/staging.h"
#include "communicator.h"
#include "kernels/reduce.h"
#include "reduction_server/server.h"
#include "transport/frame.h"
#include "transport/router.h"
#include "transport/shm/board.h"
#include "transport/shm/segment.h"
#include "transport/tcp_transport.h"
#include "transport/wire_security.h"
#ifdef COLLECTIVES_HAVE_UCX
#include "transport/ucx/ucx_transport.h"
#endif

namespace py = pybind11;
using namespace collectives;

namespace {

void* as_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

/*
 * Submits `collective` (a call of one of Communicator's collectives, given the caller's
 * Interruption or null) with the GIL released, and returns its Work. Blocking: the caller waits
 * for the Work at once, so its thread is lent to run the collective (Communicator::allreduce);
 * between waits it takes the GIL to let Python run its signal handlers, and if one raises
 * (Ctrl-C's KeyboardInterrupt) the collective ends, the communicator aborts, and that exception
 * is raised here. A blocking collective that ran here returns None, or raises its error.
 */
template <typename Collective>
py::object submit(bool blocking, Collective collective) {
  std::optional<py::error_already_set> raised;
  Interruption interrupted([&raised] {
    if (shut_out_by_finalization()) park_for_good();
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() == 0) return false;
    raised.emplace();  // takes the handler's exception from the interpreter
    return true;
  });
  std::shared_ptr<Work> work;
  {
    ReleasedGil released;
    work = collective(blocking ? &interrupted : nullptr);
  }
  if (raised) throw *raised;
  if (blocking && work->done()) {
    work->wait_for(0);  // throws the collective's error, if any
    return py::none();
  }
  return py::cast(work);
}

// A rank's transport over UCX (the links become its control links), with every descriptor
// closed if it cannot be made.
std::unique_ptr<Transport> make_ucx_transport(int rank, int size, std::vector<std::vector<Link>> links,
                                              std::vector<std::string> names, double timeout_seconds) {
#ifdef COLLECTIVES_HAVE_UCX
  try {
    loaded_ucx();
  } catch (...) {
    for (const auto& peer : links) {
      for (const Link& link : peer) ::close(link.fd);
    }
    throw;
  }
  return std::make_unique<UcxTransport>(rank, size, std::move(links), std::move(names),
                                        deadline_after(timeout_seconds));
#else
  for (const auto& peer : links) {
    for (const Link& link : peer) ::close(link.fd);
  }
  (void)rank, (void)size, (void)names, (void)timeout_seconds;
  throw CollectiveError("this build of collectives has no UCX transport: rebuild it where UCX's headers are found "
                        "(pip install libucx-cu12 before building), or choose another COLLECTIVES_TRANSPORT");
#endif
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "collectives: the compiled data plane";
  python_main_thread() = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  m.attr("PROTOCOL_VERSION") = kProtocolVersion;
  m.attr("DTYPES") = py::make_tuple("float16", "bfloat16", "float32", "float64", "int8",
                                    "uint8", "int32", "int64");  // index = DataType code
  m.attr("OPS") = py::make_tuple("sum", "avg", "min", "max", "prod");  // index = ReduceOp code
  m.def(
      "check_reducible", [](int dtype, int op) { check_reducible(checked_dtype(dtype), checked_op(op)); },
      py::arg("dtype"), py::arg("op"),
      "ValueError where reduce op code `op` cannot reduce elements of dtype code `dtype`: the check "
      "that the communicator's reductions make, for a refusal before a collective is built.");
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
  bind_c_api(m);
  bind_kernels(m);
  bind_cuda(m);
  bind_staging(m);
  m.def(
      "ring_family_choice",
      [](size_t bytes, int group_size, double alpha_seconds, double beta_seconds_per_byte) {
        // The one selection place, asked about a flat group without reducers or a plan.
        RingAllreduce ring;
        RecursiveDoublingAllreduce recursive_doubling;
        return std::string(select_allreduce({ring, recursive_doubling, nullptr}, bytes, DataType::kUInt8, group_size,
                                            {alpha_seconds, beta_seconds_per_byte})
                               .name());
      },
      py::arg("bytes"), py::arg("group_size"), py::arg("alpha_seconds"), py::arg("beta_seconds_per_byte"),
      "The all-reduce algorithm auto runs for a message of `bytes` over a flat group of `group_size` ranks "
      "under this cost model.");

  m.attr("WIRE_SECURITY") = py::make_tuple("none", "mac", "aead");  // index = WireSecurity code
  m.def(
      "derive_session_keys",
      [](const py::bytes& secret, const py::bytes& transcript) {
        return py::bytes(derive_session_keys(secret, transcript));
      },
      py::arg("secret"), py::arg("transcript"),
      "HKDF-SHA256 of the job's secret over a handshake's transcript: the client's sending key, "
      "then the server's (32 bytes each).");
  // UCX, loaded on demand by collectives/_ucx.py.
#ifdef COLLECTIVES_HAVE_UCX
  m.attr("HAVE_UCX") = true;
  m.def(
      "load_ucx", [](const std::string& path) { load_ucx(path); }, py::arg("path"),
      "Loads libucp from `path` (once per process; later calls keep the first).");
  m.def("describe_ucx", [] {
    UcxInfo info = describe_ucx();
    return py::make_tuple(info.path, info.version, info.devices);
  }, "(path, version, devices) of the UCX loaded, devices as transport/device.");
#else
  m.attr("HAVE_UCX") = false;
#endif
  // The shared-memory links that collectives/_shm.py sets up between ranks of one host.
  m.attr("SHM_SEGMENT_BYTES") = kShmSegmentBytes;
  m.def("create_shm_segment", &create_shm_segment, "A sealed memfd for the rings of one pair of ranks.");
  m.def("create_shm_doorbell", &create_shm_doorbell, "An eventfd through which peers wake this rank.");
  m.attr("BOARD_MAX_MEMBERS") = kBoardMaxMembers;
  m.def("create_shm_board", &create_shm_board, py::arg("members"),
        "A sealed memfd that every worker of one host maps: the board of the shared-memory all-reduce.");
  py::class_<ShmLink>(m, "ShmLink", "A same-host peer: the pair's segment, a descriptor that becomes readable "
                                    "when the peer is gone (a pidfd), the peer's doorbell (all owned by the core once "
                                    "handed to a Communicator), and the peer's pid (0: large messages go through the "
                                    "rings too).")
      .def(py::init([](int segment_fd, int watch_fd, int doorbell_fd, int pid) {
             return ShmLink{segment_fd, watch_fd, doorbell_fd, pid};
           }),
           py::arg("segment_fd") = -1, py::arg("watch_fd") = -1, py::arg("doorbell_fd") = -1, py::arg("pid") = 0)
      .def_readonly("segment_fd", &ShmLink::segment_fd)
      .def_readonly("watch_fd", &ShmLink::watch_fd)
      .def_readonly("doorbell_fd", &ShmLink::doorbell_fd);

  py::class_<Link>(m, "Link", "A connected, authenticated socket and the protection of its frames.")
      .def(py::init([](int fd, int security, const py::bytes& send_key, const py::bytes& recv_key) {
             if (security < 0 || security > static_cast<int>(WireSecurity::kAead)) {
               throw py::value_error("wire security must be 0 (none), 1 (mac) or 2 (aead)");
             }
             // Checked here, before the core owns the fd: a constructor that took it would
             // have to close it on every path.
             if (security != 0 && (py::len(send_key) != kSessionKeyBytes || py::len(recv_key) != kSessionKeyBytes)) {
               throw py::value_error("a session key has " + std::to_string(kSessionKeyBytes) + " bytes");
             }
             return Link{fd, static_cast<WireSecurity>(security), send_key, recv_key};
           }),
           py::arg("fd"), py::arg("security"), py::arg("send_key"), py::arg("recv_key"))
      .def_readonly("fd", &Link::fd);

  py::class_<Work, std::shared_ptr<Work>>(m, "Work")
      .def("wait_for", &Work::wait_for, py::arg("seconds"),
           py::call_guard<ReleasedGil>(),
           "True once finished (raising its error); False if `seconds` passed first.")
      .def("done", &Work::done, py::call_guard<ReleasedGil>())
      .def_property_readonly("source", &Work::source,
                             "The rank a received message came from (from any source: once done); -1 for anything else.");

  py::class_<HierarchyLevel>(m, "HierarchyLevel", "One level of a hierarchical plan (algorithms/allreduce_hierarchical.h).")
      .def(py::init<>())
      .def_readwrite("name", &HierarchyLevel::name)
      .def_readwrite("groups", &HierarchyLevel::groups)
      .def_property(
          "cost", [](const HierarchyLevel& l) { return std::make_pair(l.cost.alpha_seconds, l.cost.beta_seconds_per_byte); },
          [](HierarchyLevel& l, std::pair<double, double> v) { l.cost = {v.first, v.second}; });
  py::class_<HierarchyPlan>(m, "HierarchyPlan")
      .def(py::init<>())
      .def_readwrite("levels", &HierarchyPlan::levels)
      .def_readwrite("description", &HierarchyPlan::description);

  py::class_<CommunicatorOptions>(m, "Options")
      .def(py::init<>())
      .def_readwrite("timeout_seconds", &CommunicatorOptions::timeout_seconds)
      .def_readwrite("segment_bytes", &CommunicatorOptions::segment_bytes)
      .def_readwrite("debug", &CommunicatorOptions::debug)
      .def_readwrite("reduction_server", &CommunicatorOptions::reduction_server)
      .def_readwrite("hierarchy", &CommunicatorOptions::hierarchy)
      .def_readwrite("board_up_to_bytes", &CommunicatorOptions::board_up_to_bytes)
      .def_property(
          "cost_alpha_seconds", [](const CommunicatorOptions& o) { return o.cost.alpha_seconds; },
          [](CommunicatorOptions& o, double v) { o.cost.alpha_seconds = v; })
      .def_property(
          "cost_beta_seconds_per_byte", [](const CommunicatorOptions& o) { return o.cost.beta_seconds_per_byte; },
          [](CommunicatorOptions& o, double v) { o.cost.beta_seconds_per_byte = v; })
      .def_property(
          "rs_chunk_bytes",
          [](const CommunicatorOptions& o) { return o.reduction_server_settings.chunk_bytes; },
          [](CommunicatorOptions& o, size_t v) { o.reduction_server_settings.chunk_bytes = v; })
      .def_property(
          "rs_inflight",
          [](const CommunicatorOptions& o) { return o.reduction_server_settings.inflight; },
          [](CommunicatorOptions& o, int v) { o.reduction_server_settings.inflight = v; })
      .def_property(
          "rs_heartbeat_timeout",
          [](const CommunicatorOptions& o) { return o.reduction_server_settings.heartbeat_timeout; },
          [](CommunicatorOptions& o, double v) { o.reduction_server_settings.heartbeat_timeout = v; })
      .def_property(
          "rs_fallback_ring",
          [](const CommunicatorOptions& o) { return o.reduction_server_settings.fallback_ring; },
          [](CommunicatorOptions& o, bool v) { o.reduction_server_settings.fallback_ring = v; })
      .def_property(
          "rs_hosts", [](const CommunicatorOptions& o) { return o.reduction_server_settings.hosts; },
          [](CommunicatorOptions& o, std::vector<std::vector<int>> v) { o.reduction_server_settings.hosts = std::move(v); });

  py::class_<ReducerOptions>(m, "ReducerOptions")
      .def(py::init<>())
      .def_readwrite("threads", &ReducerOptions::threads)
      .def_readwrite("max_memory_bytes", &ReducerOptions::max_memory_bytes)
      .def_readwrite("heartbeat_interval_seconds", &ReducerOptions::heartbeat_interval_seconds)
      .def_readwrite("debug", &ReducerOptions::debug)
      .def_readwrite("ucx_library", &ReducerOptions::ucx_library);

  py::class_<ReductionServer>(m, "ReductionServer")
      .def(py::init<std::vector<Link>, std::vector<std::string>, ReducerOptions>(),
           py::arg("worker_links"), py::arg("worker_names"), py::arg("options"),
           py::call_guard<ReleasedGil>())
      .def("serve", &ReductionServer::serve, py::call_guard<ReleasedGil>(),
           "Serve the job until every worker has said goodbye; CollectiveError if it fails.")
      .def("stop", &ReductionServer::stop, py::call_guard<ReleasedGil>())
      .def("stats", [](const ReductionServer& s) {
        ReducerStats st = s.stats();
        py::dict d;
        d["bytes_received"] = st.bytes_received;
        d["bytes_sent"] = st.bytes_sent;
        d["chunks_reduced"] = st.chunks_reduced;
        d["elements_reduced"] = st.elements_reduced;
        d["workers_connected"] = st.workers_connected;
        d["workers_over_ucx"] = st.workers_over_ucx;
        return d;
      });

  py::class_<Communicator>(m, "Communicator")
      .def(py::init([](int rank, int size, std::vector<std::vector<Link>> peer_links,
                       std::vector<std::string> peer_names, CommunicatorOptions options,
                       std::vector<Link> reducer_links, std::vector<std::string> reducer_names, int doorbell_fd,
                       std::vector<ShmLink> shm_links, int board_fd, bool board_expected, bool ucx) {
             FileDescriptor board_memory(board_fd);
             std::unique_ptr<Transport> transport;
             std::unique_ptr<ShmBoard> board;
             options.reduction_server_settings.ucx = ucx;  // the reducers' frames too
             try {
               transport = ucx ? make_ucx_transport(rank, size, std::move(peer_links), std::move(peer_names),
                                                    options.timeout_seconds)
                               : make_transport(rank, size, std::move(peer_links), std::move(peer_names), doorbell_fd,
                                                std::move(shm_links));
               if (board_memory.get() >= 0) {
                 std::vector<int> world(size);
                 for (int r = 0; r < size; ++r) world[r] = r;
                 board = std::make_unique<ShmBoard>(std::move(board_memory), std::move(world), rank);
               }
             } catch (...) {
               for (const Link& link : reducer_links) ::close(link.fd);  // handed over too
               throw;
             }
             return std::make_unique<Communicator>(std::move(transport), options, std::move(reducer_links),
                                                   std::move(reducer_names), board_expected, std::move(board));
           }),
           py::arg("rank"), py::arg("size"), py::arg("peer_links"), py::arg("peer_names"),
           py::arg("options"), py::arg("reducer_links") = std::vector<Link>{},
           py::arg("reducer_names") = std::vector<std::string>{}, py::arg("doorbell_fd") = -1,
           py::arg("shm_links") = std::vector<ShmLink>{}, py::arg("board_fd") = -1, py::arg("board_expected") = false,
           py::arg("ucx") = false,
           py::call_guard<ReleasedGil>())
      .def("reducer_stats", [](const Communicator& c) {
        py::list result;
        for (const auto& st : c.reducer_stats()) {
          py::dict d;
          d["name"] = st.name;
          d["alive"] = st.alive;
          d["bytes_sent"] = st.bytes_sent;
          d["bytes_received"] = st.bytes_received;
          d["transport"] = st.transport;
          result.append(d);
        }
        return result;
      })
      .def_property_readonly(
          "address", [](Communicator& c) { return reinterpret_cast<uintptr_t>(&c); },
          "This communicator's handle in the C API (bindings/c_api.cc).")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("members", &Communicator::members)
      .def(
          "subgroup",
          [](Communicator& c, const std::vector<int>& ranks, const CommunicatorOptions& options) {
            return c.subgroup(ranks, options.cost, options.hierarchy);
          },
          py::arg("ranks"), py::arg("options"), py::call_guard<ReleasedGil>())
      .def(
          "allreduce",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int op, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.allreduce(as_pointer(data), count, checked_dtype(dtype), checked_op(op), caller);
            });
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("blocking") = false)
      .def(
          "allgather",
          [](Communicator& c, uintptr_t input, uintptr_t output, size_t count, int dtype, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.allgather(as_pointer(input), as_pointer(output), count, checked_dtype(dtype), caller);
            });
          },
          py::arg("input"), py::arg("output"), py::arg("count"), py::arg("dtype"), py::arg("blocking") = false)
      .def(
          "broadcast",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int root, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.broadcast(as_pointer(data), count, checked_dtype(dtype), root, caller);
            });
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("blocking") = false)
      .def(
          "reduce_scatter",
          [](Communicator& c, uintptr_t input, uintptr_t output, size_t count, int dtype, int op, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.reduce_scatter(as_pointer(input), as_pointer(output), count, checked_dtype(dtype),
                                      checked_op(op), caller);
            });
          },
          py::arg("input"), py::arg("output"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          py::arg("blocking") = false)
      .def(
          "barrier",
          [](Communicator& c, bool blocking) {
            return submit(blocking, [&](Interruption* caller) { return c.barrier(caller); });
          },
          py::arg("blocking") = false)
      .def(
          "reduce",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int op, int root, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.reduce(as_pointer(data), count, checked_dtype(dtype), checked_op(op), root, caller);
            });
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("root"),
          py::arg("blocking") = false)
      .def(
          "gather",
          [](Communicator& c, uintptr_t input, uintptr_t output, size_t count, int dtype, int root, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.gather(as_pointer(input), as_pointer(output), count, checked_dtype(dtype), root, caller);
            });
          },
          py::arg("input"), py::arg("output"), py::arg("count"), py::arg("dtype"), py::arg("root"),
          py::arg("blocking") = false)
      .def(
          "scatter",
          [](Communicator& c, uintptr_t input, uintptr_t output, size_t count, int dtype, int root, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.scatter(as_pointer(input), as_pointer(output), count, checked_dtype(dtype), root, caller);
            });
          },
          py::arg("input"), py::arg("output"), py::arg("count"), py::arg("dtype"), py::arg("root"),
          py::arg("blocking") = false)
      .def(
          "alltoall",
          [](Communicator& c, uintptr_t input, std::vector<size_t> send_counts, uintptr_t output,
             std::vector<size_t> recv_counts, int dtype, bool blocking) {
            return submit(blocking, [&](Interruption* caller) {
              return c.alltoall(as_pointer(input), std::move(send_counts), as_pointer(output), std::move(recv_counts),
                                checked_dtype(dtype), caller);
            });
          },
          py::arg("input"), py::arg("send_counts"), py::arg("output"), py::arg("recv_counts"), py::arg("dtype"),
          py::arg("blocking") = false)
      .def(
          "send",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int peer, uint32_t tag) {
            return c.send(as_pointer(data), count, checked_dtype(dtype), peer, tag);
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("peer"), py::arg("tag"),
          py::call_guard<ReleasedGil>())
      .def(
          "recv",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, int peer, uint32_t tag) {
            return c.recv(as_pointer(data), count, checked_dtype(dtype), peer, tag);
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("peer"), py::arg("tag"),
          py::call_guard<ReleasedGil>())
      .def(
          "recv_any",
          [](Communicator& c, uintptr_t data, size_t count, int dtype, uint32_t tag) {
            return c.recv_any(as_pointer(data), count, checked_dtype(dtype), tag);
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("tag"),
          py::call_guard<ReleasedGil>())
      .def("abort", &Communicator::abort, py::arg("reason"),
           py::call_guard<ReleasedGil>())
      .def("close", &Communicator::close, py::call_guard<ReleasedGil>());
}
