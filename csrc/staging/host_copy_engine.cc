#include "staging/host_copy_engine.h"

#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace collectives {

void* HostCopyEngine::allocate_host(size_t bytes) {
  void* host = std::malloc(bytes > 0 ? bytes : 1);
  if (host == nullptr) throw CollectiveError("allocating " + std::to_string(bytes) + " bytes of staging memory failed");
  return host;
}

void HostCopyEngine::free_host(void* host) noexcept { std::free(host); }

void HostCopyEngine::copy(void* dst, const void* src, size_t bytes, Done done) {
  worker_.post([dst, src, bytes, done = std::move(done)] {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    done(nullptr);
  });
}

}  // namespace collectives
