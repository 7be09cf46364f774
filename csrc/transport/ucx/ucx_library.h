// UCX (libucp) as the core reaches it: loaded at run time (dlopen), so that the extension
// imports, and every other transport works, where UCX is not installed. The build needs UCX's
// headers only (CMakeLists.txt: the libucx wheel or a system libucx-dev); the library comes
// from wherever the control plane finds it (collectives/_ucx.py: the libucx wheel's lib/, else
// the system's libucp.so.0).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ucp/api/ucp.h>

namespace collectives {

// The UCP calls the transport makes, resolved from one loaded libucp.
struct UcxLibrary {
  decltype(&ucp_config_read) config_read;
  decltype(&ucp_config_release) config_release;
  decltype(&ucp_config_modify) config_modify;
  decltype(&ucp_init_version) init_version;
  decltype(&ucp_cleanup) cleanup;
  decltype(&ucp_get_version_string) get_version_string;
  decltype(&ucp_get_version) get_version;
  decltype(&ucp_context_print_info) context_print_info;
  decltype(&ucp_worker_create) worker_create;
  decltype(&ucp_worker_destroy) worker_destroy;
  decltype(&ucp_worker_get_address) worker_get_address;
  decltype(&ucp_worker_release_address) worker_release_address;
  decltype(&ucp_worker_progress) worker_progress;
  decltype(&ucp_worker_get_efd) worker_get_efd;
  decltype(&ucp_worker_arm) worker_arm;
  decltype(&ucp_ep_create) ep_create;
  decltype(&ucp_ep_close_nbx) ep_close_nbx;
  decltype(&ucp_tag_send_nbx) tag_send_nbx;
  decltype(&ucp_tag_recv_nbx) tag_recv_nbx;
  decltype(&ucp_tag_recv_request_test) tag_recv_request_test;
  decltype(&ucp_stream_send_nbx) stream_send_nbx;
  decltype(&ucp_stream_recv_nbx) stream_recv_nbx;
  decltype(&ucp_stream_recv_request_test) stream_recv_request_test;
  decltype(&ucp_request_check_status) request_check_status;
  decltype(&ucp_request_cancel) request_cancel;
  decltype(&ucp_request_free) request_free;
  decltype(&ucs_status_string) status_string;
  std::string path;  // the file loaded

  // ucp_init for the library loaded: it may be older than the headers (Open MPI's own, under
  // mpirun), and the calls made here are all in UCX 1.12 and later, so it is asked for the API
  // it has rather than warn that the headers' is newer.
  ucs_status_t init(const ucp_params_t* params, const ucp_config_t* config, ucp_context_h* context) const;

  // "UCX 1.18.1: Input/output error" style text for a status.
  std::string describe(ucs_status_t status) const { return status_string(status); }
};

// Loads libucp from `path` (a file, or a name the dynamic loader searches for) once per
// process, unless the process has one already (then that one); later calls return the library
// already loaded. Throws CollectiveError, saying what
// to install, if it cannot.
const UcxLibrary& load_ucx(const std::string& path);
// The library load_ucx loaded; throws CollectiveError if none was.
const UcxLibrary& loaded_ucx();

// Starts a UCX context with `features` and UCP_FEATURE_WAKEUP, and a worker of it used by one
// thread at a time (UCS_THREAD_MODE_SERIALIZED) with its wake-up descriptor. Each of `settings`
// (a UCX setting's name without UCX_, a value) is set unless UCX's environment sets it.
// CollectiveError if UCX cannot; what was made is in *context and *worker, for the caller to
// release either way.
void start_ucx_worker(const UcxLibrary& ucx, uint64_t features,
                      const std::vector<std::pair<std::string, std::string>>& settings, ucp_context_h* context,
                      ucp_worker_h* worker, int* fd);

// What UCX says of itself on this host: its version, and each device it can use as
// "transport/device" (tcp/eth0, posix/memory, rc_mlx5/mlx5_0:1, ...).
struct UcxInfo {
  std::string path;  // the libucp loaded
  std::string version;
  std::vector<std::string> devices;
};
UcxInfo describe_ucx();

}  // namespace collectives
