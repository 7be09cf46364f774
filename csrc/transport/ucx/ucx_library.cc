#include "transport/ucx/ucx_library.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include <memory>
#include <mutex>
#include <cstdlib>
#include <sstream>

#include "common/error.h"

namespace collectives {

namespace {

std::mutex loading;
std::unique_ptr<UcxLibrary> loaded;  // guarded by loading; never unloaded

template <typename Function>
void resolve(void* handle, const char* name, Function& into) {
  into = reinterpret_cast<Function>(dlsym(handle, name));
  if (into == nullptr) {
    throw CollectiveError(std::string("the UCX library loaded lacks ") + name + ": install UCX 1.12 or newer");
  }
}

}  // namespace

const UcxLibrary& load_ucx(const std::string& path) {
  std::lock_guard<std::mutex> lock(loading);
  if (loaded) return *loaded;
  // A libucp already in the process (Open MPI's, under mpirun) is the one to use: loading a
  // second would bind its libucs to the first's, of another version.
  void* handle = dlopen("libucp.so.0", RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    throw CollectiveError("cannot load UCX (" + path + "): " + dlerror() +
                          ". Install it (pip install libucx-cu12, or the system's libucx0) or choose another "
                          "COLLECTIVES_TRANSPORT");
  }
  auto library = std::make_unique<UcxLibrary>();
  UcxLibrary& l = *library;
  resolve(handle, "ucp_config_read", l.config_read);
  resolve(handle, "ucp_config_release", l.config_release);
  resolve(handle, "ucp_config_modify", l.config_modify);
  resolve(handle, "ucp_init_version", l.init_version);
  resolve(handle, "ucp_cleanup", l.cleanup);
  resolve(handle, "ucp_get_version_string", l.get_version_string);
  resolve(handle, "ucp_get_version", l.get_version);
  resolve(handle, "ucp_context_print_info", l.context_print_info);
  resolve(handle, "ucp_worker_create", l.worker_create);
  resolve(handle, "ucp_worker_destroy", l.worker_destroy);
  resolve(handle, "ucp_worker_get_address", l.worker_get_address);
  resolve(handle, "ucp_worker_release_address", l.worker_release_address);
  resolve(handle, "ucp_worker_progress", l.worker_progress);
  resolve(handle, "ucp_worker_get_efd", l.worker_get_efd);
  resolve(handle, "ucp_worker_arm", l.worker_arm);
  resolve(handle, "ucp_ep_create", l.ep_create);
  resolve(handle, "ucp_ep_close_nbx", l.ep_close_nbx);
  resolve(handle, "ucp_tag_send_nbx", l.tag_send_nbx);
  resolve(handle, "ucp_tag_recv_nbx", l.tag_recv_nbx);
  resolve(handle, "ucp_tag_recv_request_test", l.tag_recv_request_test);
  resolve(handle, "ucp_stream_send_nbx", l.stream_send_nbx);
  resolve(handle, "ucp_stream_recv_nbx", l.stream_recv_nbx);
  resolve(handle, "ucp_stream_recv_request_test", l.stream_recv_request_test);
  resolve(handle, "ucp_request_check_status", l.request_check_status);
  resolve(handle, "ucp_request_cancel", l.request_cancel);
  resolve(handle, "ucp_request_free", l.request_free);
  resolve(handle, "ucs_status_string", l.status_string);  // libucs, a dependency of libucp
  Dl_info where{};
  l.path = dladdr(reinterpret_cast<void*>(l.worker_create), &where) && where.dli_fname ? where.dli_fname : path;
  loaded = std::move(library);
  return *loaded;
}

ucs_status_t UcxLibrary::init(const ucp_params_t* params, const ucp_config_t* config, ucp_context_h* context) const {
  unsigned major = 0, minor = 0, release = 0;
  get_version(&major, &minor, &release);
  if (major == UCP_API_MAJOR && minor < UCP_API_MINOR) return init_version(major, minor, params, config, context);
  return init_version(UCP_API_MAJOR, UCP_API_MINOR, params, config, context);
}

void start_ucx_worker(const UcxLibrary& ucx, uint64_t features,
                      const std::vector<std::pair<std::string, std::string>>& settings, ucp_context_h* context,
                      ucp_worker_h* worker, int* fd) {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucx.config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) throw CollectiveError("UCX could not read its configuration: " + ucx.describe(status));
  for (const auto& [name, value] : settings) {
    if (std::getenv(("UCX_" + name).c_str()) == nullptr) ucx.config_modify(config, name.c_str(), value.c_str());
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = features | UCP_FEATURE_WAKEUP;
  status = ucx.init(&params, config, context);
  ucx.config_release(config);
  if (status != UCS_OK) throw CollectiveError("UCX could not start: " + ucx.describe(status));
  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  status = ucx.worker_create(*context, &worker_params, worker);
  if (status != UCS_OK) throw CollectiveError("UCX could not create a worker: " + ucx.describe(status));
  status = ucx.worker_get_efd(*worker, fd);
  if (status != UCS_OK) throw CollectiveError("UCX gave no wake-up descriptor: " + ucx.describe(status));
}

const UcxLibrary& loaded_ucx() {
  std::lock_guard<std::mutex> lock(loading);
  if (!loaded) throw CollectiveError("UCX is not loaded (collectives._ucx.load() loads it)");
  return *loaded;
}

UcxInfo describe_ucx() {
  const UcxLibrary& ucx = loaded_ucx();
  UcxInfo info{ucx.path, ucx.get_version_string(), {}};
  ucp_config_t* config = nullptr;
  if (ucx.config_read(nullptr, nullptr, &config) != UCS_OK) return info;
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG;
  ucp_context_h context = nullptr;
  const ucs_status_t status = ucx.init(&params, config, &context);
  ucx.config_release(config);
  if (status != UCS_OK) return info;
  // The context's resources, one a line: "#      resource 1  :  md 1  dev 1  flags -- tcp/lo".
  char* text = nullptr;
  size_t length = 0;
  if (FILE* stream = open_memstream(&text, &length)) {
    ucx.context_print_info(context, stream);
    fclose(stream);
    std::istringstream lines(std::string(text, length));
    for (std::string line; std::getline(lines, line);) {
      const size_t marker = line.find("-- ");
      if (line.find("resource") != std::string::npos && marker != std::string::npos) {
        info.devices.push_back(line.substr(marker + 3));
      }
    }
    free(text);
  }
  ucx.cleanup(context);
  return info;
}

}  // namespace collectives
