#include "transport/shm/segment.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <stdexcept>
#include <utility>

#include "transport/socket.h"

namespace collectives {
namespace {

constexpr int kSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

[[noreturn]] void refuse(const std::string& what) { throw std::runtime_error(what + ": " + errno_text(errno)); }

}  // namespace

int create_shm_segment() {
  const int fd = memfd_create("collectives-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) refuse("memfd_create failed");
  if (ftruncate(fd, kShmSegmentBytes) != 0 || fcntl(fd, F_ADD_SEALS, kSeals) != 0) {
    const int err = errno;
    ::close(fd);
    errno = err;
    refuse("could not size and seal a shared-memory segment");
  }
  return fd;
}

int create_shm_doorbell() {
  const int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) refuse("eventfd failed");
  return fd;
}

ShmMapping::ShmMapping(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) refuse("fstat of a shared-memory segment failed");
  const int seals = fcntl(fd, F_GET_SEALS);
  if (static_cast<size_t>(st.st_size) != kShmSegmentBytes || seals < 0 || (seals & kSeals) != kSeals) {
    throw std::runtime_error("the peer's shared-memory segment is not one of this version's (size " +
                             std::to_string(st.st_size) + ", expected " + std::to_string(kShmSegmentBytes) +
                             ", or not sealed)");
  }
  void* at = mmap(nullptr, kShmSegmentBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (at == MAP_FAILED) refuse("mmap of a shared-memory segment failed");
  layout_ = static_cast<ShmSegmentLayout*>(at);
}

ShmMapping::ShmMapping(ShmMapping&& other) noexcept : layout_(std::exchange(other.layout_, nullptr)) {}

ShmMapping& ShmMapping::operator=(ShmMapping&& other) noexcept {
  if (this != &other) {
    if (layout_) munmap(layout_, kShmSegmentBytes);
    layout_ = std::exchange(other.layout_, nullptr);
  }
  return *this;
}

ShmMapping::~ShmMapping() {
  if (layout_) munmap(layout_, kShmSegmentBytes);
}

}  // namespace collectives
