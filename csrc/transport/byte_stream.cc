#include "transport/byte_stream.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include "common/error.h"
#include "transport/socket.h"
#ifdef COLLECTIVES_HAVE_UCX
#include "transport/ucx/ucx_stream.h"
#endif

namespace collectives {

ssize_t SocketStream::read_some(char* into, size_t n) { return ::recv(fd_, into, n, 0); }

ssize_t SocketStream::write_some(const iovec* iov, int parts) {
  msghdr message{};
  message.msg_iov = const_cast<iovec*>(iov);
  message.msg_iovlen = parts;
  const ssize_t n = ::sendmsg(fd_, &message, MSG_NOSIGNAL);
  if (n < 0) return would_block(errno) ? 0 : -1;
  return n;
}

void SocketStream::wait(short events, int millis) {
  pollfd pfd{fd_, events, 0};
  poll(&pfd, 1, millis);
}

void SocketStream::end_writes() { ::shutdown(fd_, SHUT_WR); }

std::unique_ptr<StreamWorker> make_ucx_stream_worker(const std::string& library) {
#ifdef COLLECTIVES_HAVE_UCX
  return std::make_unique<UcxStreamWorker>(library.empty() ? loaded_ucx() : load_ucx(library));
#else
  (void)library;
  throw CollectiveError("this build of collectives has no UCX transport: rebuild it where UCX's headers are found "
                        "(pip install libucx-cu12 before building), or choose another COLLECTIVES_TRANSPORT");
#endif
}

}  // namespace collectives
