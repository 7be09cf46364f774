#include "transport/socket.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

#include "common/error.h"

namespace collectives {

std::string errno_text(int err) { return std::strerror(err); }

bool would_block(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }

void set_nonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    throw std::runtime_error("fcntl(O_NONBLOCK) failed: " + errno_text(errno));
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

void set_keepalive(int fd, int idle_seconds, int interval_seconds, int count) {
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_seconds, sizeof(idle_seconds));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_seconds, sizeof(interval_seconds));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
}

double seconds_since_peer_acked(int fd) {
  tcp_info info{};
  socklen_t length = sizeof(info);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0) return -1;
  return info.tcpi_last_ack_recv / 1000.0;
}

bool idle_link_stirred(int fd) {
  char byte;
  const ssize_t n = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n >= 0 || !would_block(errno);
}

Poller::Poller()
    : epoll_fd_(epoll_create1(EPOLL_CLOEXEC)), wake_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (epoll_fd_.get() < 0 || wake_fd_.get() < 0) {
    throw std::runtime_error("epoll/eventfd: " + errno_text(errno));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;  // the wake-up eventfd
  epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &ev);
}

uint32_t Poller::watch(int fd, uint32_t watched, uint32_t wanted, void* data) {
  if (wanted == watched) return wanted;
  epoll_event ev{};
  ev.events = wanted;
  ev.data.ptr = data;
  const int op = wanted == 0 ? EPOLL_CTL_DEL : watched == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
  epoll_ctl(epoll_fd_.get(), op, fd, &ev);
  return wanted;
}

int Poller::wait(epoll_event* events, int max, int millis, bool* woken) {
  if (woken) *woken = false;
  int n = epoll_wait(epoll_fd_.get(), events, max, millis);
  int kept = 0;
  for (int i = 0; i < n; ++i) {
    if (events[i].data.ptr != nullptr) {
      events[kept++] = events[i];
      continue;
    }
    uint64_t count;
    [[maybe_unused]] ssize_t ignored = read(wake_fd_.get(), &count, sizeof(count));
    if (woken) *woken = true;
  }
  return n < 0 ? n : kept;
}

void Poller::wake() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t ignored = write(wake_fd_.get(), &one, sizeof(one));
}

Latch::Latch() : fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (fd_.get() < 0) throw std::runtime_error("eventfd: " + errno_text(errno));
}

void Latch::raise() {
  // Never read: the counter stays above zero, so the fd stays readable.
  uint64_t one = 1;
  [[maybe_unused]] ssize_t ignored = write(fd_.get(), &one, sizeof(one));
}

}  // namespace collectives
