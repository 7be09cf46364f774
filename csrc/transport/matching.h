// How a transport matches a peer's frames with receives when several communicators share it
// (FrameHeader::comm): in posting order within each communicator. A frame whose communicator
// has no receive posted while another communicator's receive waits on the same link is read
// ahead into memory (stashed), since ranks may run different communicators' collectives in
// different orders; with no receive posted at all it is left where it is (parked), so that a
// fast sender is held back. Shared by TcpTransport and ShmTransport.
// FrameHeader is packed, so a communicator id used as a map key is copied out first
// (uint64_t{h.comm}): a reference bound to a packed field may be misaligned.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <new>
#include <string>
#include <vector>

#include "transport/frame.h"

namespace collectives {

struct StashedFrame {
  FrameHeader header;
  std::vector<char> payload;
};

// Whether receives are posted on a link, for any communicator.
template <typename ReceivesByCommunicator>
bool any_waiting(const ReceivesByCommunicator& recvs) {
  return std::any_of(recvs.begin(), recvs.end(), [](const auto& entry) { return !entry.second.empty(); });
}

// Whether the frame with header `h` goes to memory of its own (read ahead), given the
// receives and stashed frames of its link.
template <typename ReceivesByCommunicator>
bool read_ahead(const FrameHeader& h, ReceivesByCommunicator& recvs, std::map<uint64_t, std::deque<StashedFrame>>& stashed) {
  return !stashed[uint64_t{h.comm}].empty() || (recvs[uint64_t{h.comm}].empty() && any_waiting(recvs));
}

// A frame read ahead waits in memory for its receive, and its size comes from a header that is
// not yet authenticated (the tag follows the payload): it is bounded. A collective's messages
// are segments of a few MiB, or a small buffer whole (recursive doubling).
constexpr uint64_t kMaxReadAheadBytes = uint64_t{256} << 20;

// Memory for a frame read ahead from `who`; empty, with why in *refused, if it cannot have it.
inline std::vector<char> read_ahead_buffer(const std::string& who, const FrameHeader& h, std::string* refused) {
  const std::string what = who + " sent a frame of " + std::to_string(h.nbytes) +
                           " bytes for a collective this rank has not reached, more than ";
  if (h.nbytes > kMaxReadAheadBytes) {
    *refused = what + "the " + std::to_string(kMaxReadAheadBytes >> 20) + " MiB it holds for one";
    return {};
  }
  try {
    return std::vector<char>(h.nbytes);
  } catch (const std::bad_alloc&) {
    *refused = what + "it can hold";
    return {};
  }
}

// Fills a receive (`expected`, into `data`) from the first frame stashed for its communicator,
// which it takes: empty, or why the frame is not the one expected (nothing is copied then).
inline std::string take_stashed(std::deque<StashedFrame>& stash, const FrameHeader& expected, void* data) {
  const StashedFrame frame = std::move(stash.front());
  stash.pop_front();
  std::string why = mismatch(expected, frame.header);
  if (why.empty() && frame.header.nbytes > 0) std::memcpy(data, frame.payload.data(), frame.header.nbytes);
  return why;
}

}  // namespace collectives
