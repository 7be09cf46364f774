// Small helpers for the non-blocking sockets of every event loop in the core (the ring's
// transport, the reduction server and its clients).
#pragma once

#include <sys/epoll.h>

#include <cstdint>
#include <string>

#include "common/file_descriptor.h"

namespace collectives {

std::string errno_text(int err);
// EAGAIN, EWOULDBLOCK or EINTR: try again later, nothing failed.
bool would_block(int err);
// O_NONBLOCK and TCP_NODELAY; throws std::runtime_error if fcntl fails.
void set_nonblocking(int fd);
// TCP keepalive: after `idle_seconds` with nothing received, a probe every `interval_seconds`;
// the kernel ends the connection once `count` probes in a row went unanswered.
void set_keepalive(int fd, int idle_seconds, int interval_seconds, int count);
// Seconds since the peer's TCP last acknowledged anything on fd (its kernel, not its
// process: a stopped process's host still answers), or a negative value if unknown.
double seconds_since_peer_acked(int fd);
// Whether a link that should carry nothing more (its frames moved to another stream) has
// ended, or carries something after all: either way the peer is gone or broke the protocol.
bool idle_link_stirred(int fd);

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

// An eventfd that stays readable once raised: a thread blocked in poll() on its own socket
// hears through it what it would otherwise miss (a transport's failure).
class Latch {
 public:
  Latch();  // std::runtime_error if the kernel refuses
  void raise();  // from any thread; idempotent
  int fd() const { return fd_.get(); }

 private:
  FileDescriptor fd_;
};

}  // namespace collectives
