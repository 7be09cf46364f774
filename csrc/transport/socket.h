// Small helpers for the non-blocking sockets of every event loop in the core (the ring's
// transport, the reduction server and its clients).
#pragma once

#include <string>

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

}  // namespace collectives
