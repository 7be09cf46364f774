// Small helpers for the non-blocking sockets of every event loop in the core (the ring's
// transport, the reduction server and its clients).
#pragma once

#include <sys/epoll.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/file_descriptor.h"
#include "transport/frame.h"

namespace collectives {

std::string errno_text(int err);
// EAGAIN, EWOULDBLOCK or EINTR: try again later, nothing failed.
bool would_block(int err);
// O_NONBLOCK and TCP_NODELAY; throws std::runtime_error if fcntl fails.
void set_nonblocking(int fd);
// Writes a whole small frame on a non-blocking socket, waiting at most `millis` for room;
// false if the socket failed or stayed full. For the rare frames sent outside the data path
// (goodbye, abort).
bool write_frame(int fd, const FrameHeader& header, const std::string& payload, int millis);

// The reading end of one socket's frames, for event loops that read whatever comes: first a
// header, then its payload into memory the caller names once it has seen the header. The
// bytes arrive in pieces of any size.
class FrameReader {
 public:
  enum class Event { kNone, kHeader, kFrame };
  const FrameHeader& header() const { return header_; }
  // Where the next bytes go.
  char* next() {
    return in_header() ? reinterpret_cast<char*>(&header_) + header_bytes_ : payload_ + payload_bytes_;
  }
  // How many bytes, at most `limit`, still belong to the current header or payload.
  size_t wanted(uint64_t limit) const {
    return static_cast<size_t>(std::min<uint64_t>(
        limit, in_header() ? sizeof(FrameHeader) - header_bytes_ : header_.nbytes - payload_bytes_));
  }
  // `n` bytes were read into next(): kHeader when that completed the header (then call
  // read_payload_into() or next_frame()), kFrame when it completed the payload.
  Event advance(size_t n) {
    if (in_header()) {
      header_bytes_ += n;
      return in_header() ? Event::kNone : Event::kHeader;
    }
    payload_bytes_ += n;
    return payload_bytes_ == header_.nbytes ? Event::kFrame : Event::kNone;
  }
  // The payload goes to `into`; true if there is none (the frame is whole already).
  bool read_payload_into(char* into) {
    payload_ = into;
    payload_bytes_ = 0;
    return header_.nbytes == 0;
  }
  void next_frame() { header_bytes_ = 0; }

 private:
  bool in_header() const { return header_bytes_ < sizeof(FrameHeader); }

  FrameHeader header_;
  size_t header_bytes_ = 0;
  char* payload_ = nullptr;
  uint64_t payload_bytes_ = 0;
};

// An epoll set for one event loop, with an eventfd through which other threads wake it.
class Poller {
 public:
  Poller();  // std::runtime_error if the kernel refuses
  // Makes the events watched on fd `wanted` (0: none, unregistered), given that `watched`
  // are watched now, with `data` (never null) handed back by wait(); returns `wanted`.
  uint32_t watch(int fd, uint32_t watched, uint32_t wanted, void* data);
  // Waits up to `millis` (-1: without end) for socket events; returns how many it put in
  // `events` (-1 on error, errno set), and in *woken whether wake() was called meanwhile.
  int wait(epoll_event* events, int max, int millis, bool* woken = nullptr);
  // From any thread. A full eventfd counter already means "wake up": nothing is lost if the
  // write fails.
  void wake();

 private:
  FileDescriptor epoll_fd_, wake_fd_;
};

}  // namespace collectives
