// The memory two ranks of one host share: one segment per pair, holding a ring for each
// direction (shm/ring.h). It lives in a memfd, which has no name in any file system: it is
// reached only through a descriptor that its creator hands to the peer over a Unix socket
// (SCM_RIGHTS), so only the job's processes can map it, and it is gone once the last of them
// closes it, however they end (kill -9 included). Nothing is left in /dev/shm.
#pragma once

#include <cstddef>
#include <cstdint>

#include "transport/shm/ring.h"

namespace collectives {

// Bytes of each direction's ring; a power of two (ring.h's index arithmetic needs one).
constexpr uint64_t kShmRingBytes = 2 << 20;

struct ShmSegmentLayout {
  // The control plane's same-host probe (collectives/_shm.py): the creator writes a nonce
  // here, the peer writes its answer beside it, and the creator reads it back.
  uint64_t probe[2];
  RingControl control[2];  // [0]: lower rank to higher, [1]: higher to lower
  alignas(64) char data[2][kShmRingBytes];
};
constexpr size_t kShmSegmentBytes = sizeof(ShmSegmentLayout);

// A new memfd of `bytes`, sealed so that its size can never change (a peer that shrank it
// would make this process's next access to the mapping a SIGBUS). Returns the descriptor;
// std::runtime_error if the kernel refuses.
int create_sealed_memfd(const char* name, size_t bytes);
// A pair's segment: create_sealed_memfd of kShmSegmentBytes.
int create_shm_segment();
// An eventfd through which peers wake a rank (ShmTransport's doorbell).
int create_shm_doorbell();

// A sealed memfd of `bytes` mapped into this process, after checking that it is one (its
// size and seals): std::runtime_error if not, or if mmap fails.
class SealedMapping {
 public:
  SealedMapping() = default;
  SealedMapping(int fd, size_t bytes);
  SealedMapping(SealedMapping&& other) noexcept;
  SealedMapping& operator=(SealedMapping&& other) noexcept;
  SealedMapping(const SealedMapping&) = delete;
  SealedMapping& operator=(const SealedMapping&) = delete;
  ~SealedMapping();
  void* get() const { return at_; }

 private:
  void* at_ = nullptr;
  size_t bytes_ = 0;
};

// A pair's segment mapped.
class ShmMapping {
 public:
  ShmMapping() = default;
  explicit ShmMapping(int fd) : mapping_(fd, kShmSegmentBytes) {}
  ShmSegmentLayout* get() const { return static_cast<ShmSegmentLayout*>(mapping_.get()); }

 private:
  SealedMapping mapping_;
};

}  // namespace collectives
