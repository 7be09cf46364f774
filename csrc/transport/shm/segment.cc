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

int create_sealed_memfd(const char* name, size_t bytes) {
  const int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) refuse("memfd_create failed");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0 || fcntl(fd, F_ADD_SEALS, kSeals) != 0) {
    const int err = errno;
    ::close(fd);
    errno = err;
    refuse("could not size and seal a shared-memory segment");
  }
  return fd;
}

int create_shm_segment() { return create_sealed_memfd("collectives-shm", kShmSegmentBytes); }

int create_shm_doorbell() {
  const int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) refuse("eventfd failed");
  return fd;
}

SealedMapping::SealedMapping(int fd, size_t bytes) {
  struct stat st;
  if (fstat(fd, &st) != 0) refuse("fstat of a shared-memory segment failed");
  const int seals = fcntl(fd, F_GET_SEALS);
  if (static_cast<size_t>(st.st_size) != bytes || seals < 0 || (seals & kSeals) != kSeals) {
    throw std::runtime_error("a shared-memory segment from a peer is not one of this version's (size " +
                             std::to_string(st.st_size) + ", expected " + std::to_string(bytes) +
                             ", or not sealed)");
  }
  void* at = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (at == MAP_FAILED) refuse("mmap of a shared-memory segment failed");
  at_ = at;
  bytes_ = bytes;
}

SealedMapping::SealedMapping(SealedMapping&& other) noexcept
    : at_(std::exchange(other.at_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

SealedMapping& SealedMapping::operator=(SealedMapping&& other) noexcept {
  if (this != &other) {
    if (at_) munmap(at_, bytes_);
    at_ = std::exchange(other.at_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

SealedMapping::~SealedMapping() {
  if (at_) munmap(at_, bytes_);
}

}  // namespace collectives
