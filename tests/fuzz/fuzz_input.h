// What the C++ fuzz targets share (libFuzzer; CMake option COLLECTIVES_BUILD_FUZZERS): how an
// input becomes what peers send, the loopback connections it travels on, and the checks that
// an input leaves nothing behind.
//
// An input's first byte is its mode; the rest is what the peers send.
//  - mode & 3: the connections' wire security: 0 none, 1 mac, 2 aead (3 reads as none).
//  - mode & kFramed: framed, else raw.
// Raw: the rest is the byte stream of connection 0, as it is. Under none the parser sees
// exactly these bytes; under mac and aead they end at the first integrity check.
// Framed: the rest is records [connection:u8][FrameHeader][header.nbytes payload bytes], each
// one frame on connection (byte % connections) and, under mac or aead, sealed by the harness
// with that connection's key: a fuzzer cannot forge tags, so this is how it reaches what lies
// behind the integrity check. A record cut short by the end of the input goes out as far as
// it goes, untagged. A connection byte with kPause set starts a new phase: a target that reads
// what the code under test answers sends the next phase once the answers have stopped (a
// worker's goodbye after its sums), others send the phases back to back.
#pragma once

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/types.h"
#include "transport/frame.h"
#include "transport/wire_security.h"

namespace collectives {
namespace fuzz {

constexpr uint8_t kFramed = 4;
constexpr uint8_t kPause = 0x80;

// What the targets wait for, and the seeds in corpus/ send: kUnits messages of kUnitBytes of
// the ring's collective (ring_frames), or the sums of kUnits chunks of the all-reduce at the
// reducers (reducer_answers).
constexpr uint32_t kUnits = 4;
constexpr uint64_t kUnitBytes = 64;
inline CollectiveTag ring_collective() {
  return {CollectiveKind::kAllreduce, 7, kUnits * kUnitBytes / 4, DataType::kFloat32, ReduceOp::kSum};
}
inline CollectiveTag reduced_allreduce() {
  return {CollectiveKind::kAllreduce, 3, kUnits * kUnitBytes / 4, DataType::kFloat32, ReduceOp::kSum};
}
// Every input ends the peers' streams, so a wait never needs long: one that reaches this
// deadline is a hang (wait_for_the_end). Below the -timeout that scripts/fuzz gives libFuzzer.
constexpr double kWaitSeconds = 5;

inline uint8_t mode_byte(WireSecurity security, bool framed) {
  return static_cast<uint8_t>(security) | (framed ? kFramed : 0);
}

// Fixed keys: a crash must replay from its input alone. `to_peer` is the direction in which
// the code under test sends.
inline std::string session_key(int connection, bool to_peer) {
  return std::string(kSessionKeyBytes, static_cast<char>(2 * connection + (to_peer ? 2 : 1)));
}

// What the peers send on each of `connections` connections, in phases, and how those are
// protected.
struct PeerStreams {
  WireSecurity security = WireSecurity::kNone;
  bool framed = false;
  std::vector<std::vector<std::string>> phases;  // [phase][connection]
};

inline PeerStreams peer_streams(const uint8_t* data, size_t size, int connections) {
  PeerStreams streams;
  streams.phases.emplace_back(connections);
  if (size == 0) return streams;
  streams.security = static_cast<WireSecurity>((data[0] & 3) % 3);
  streams.framed = (data[0] & kFramed) != 0;
  const char* in = reinterpret_cast<const char*>(data) + 1;
  const char* end = reinterpret_cast<const char*>(data) + size;
  if (!streams.framed) {
    streams.phases[0][0].assign(in, end);
    return streams;
  }
  std::vector<FrameProtection> sealers;
  for (int c = 0; c < connections; ++c) sealers.emplace_back(streams.security, session_key(c, false));
  while (in < end) {
    const auto connection_byte = static_cast<uint8_t>(*in++);
    if (connection_byte & kPause) streams.phases.emplace_back(connections);
    const int c = connection_byte % connections;
    std::string& out = streams.phases.back()[c];
    FrameHeader header;
    const auto left = static_cast<uint64_t>(end - in);
    if (left >= sizeof(header)) std::memcpy(&header, in, sizeof(header));
    if (left < sizeof(header) || header.nbytes > left - sizeof(header)) {
      out.append(in, end);
      break;
    }
    const char* payload = in + sizeof(header);
    std::string sealed(payload, header.nbytes);  // aead: encrypted in place of the payload
    unsigned char tag[kTagBytes];
    sealers[c].seal(header, payload, sealed.data(), header.nbytes, tag);
    out.append(in, sizeof(header)).append(sealed);
    out.append(reinterpret_cast<const char*>(tag), sealers[c].tag_bytes());
    in = payload + header.nbytes;
  }
  return streams;
}

// The lowest free descriptor number: it changes if an input leaves a descriptor open.
inline int lowest_free_fd() {
  const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ::close(fd);
  return fd;
}

// One listener for the whole run, rather than one per input.
inline int loopback_listener() {
  static const int listener = [] {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 64) != 0) {
      throw std::runtime_error("loopback listen failed");
    }
    return fd;
  }();
  return listener;
}

// The peers an input plays: `connections` loopback connections whose far ends (links) go to
// the code under test, protected as the input says. Declare it before the code under test,
// so that its destructor runs last: it closes the peers' ends, then checks that the code
// under test closed all of its own.
class Peers {
 public:
  Peers(const PeerStreams& streams, int connections) : streams_(streams) {
    const int listener = loopback_listener();
    free_fd_ = lowest_free_fd();
    sockaddr_in addr{};
    socklen_t len = sizeof(addr);
    ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
    for (int c = 0; c < connections; ++c) {
      const int peer = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      fds_.push_back(peer);
      if (!connect_to(peer, addr)) {
        throw std::runtime_error(std::string("loopback connect failed: ") + std::strerror(errno));
      }
      int accepted;
      while ((accepted = ::accept(listener, nullptr, nullptr)) < 0 && errno == EINTR) {
      }
      links.push_back(Link{accepted, streams.security, session_key(c, true), session_key(c, false)});
    }
  }
  Peers(const Peers&) = delete;
  Peers& operator=(const Peers&) = delete;
  ~Peers() {
    // Closed with a reset, after the code under test is done: a connection per input left in
    // TIME_WAIT would use up the ports of a long run (some thousand inputs a second).
    const linger reset{1, 0};
    for (int fd : fds_) {
      ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
      ::close(fd);
    }
    if (lowest_free_fd() != free_fd_) {
      std::fprintf(stderr, "fuzz: this input left a file descriptor open\n");
      std::abort();
    }
  }

  int fd(int connection) const { return fds_[connection]; }
  int size() const { return static_cast<int>(fds_.size()); }
  size_t phases() const { return streams_.phases.size(); }
  // Each peer sends its bytes of `phase`; returns how many, all peers together. Inputs are far
  // smaller than a socket's buffer: nothing here waits for the code under test to read.
  uint64_t send(size_t phase) const {
    uint64_t total = 0;
    for (size_t c = 0; c < fds_.size(); ++c) {
      const std::string& bytes = streams_.phases[phase][c];
      for (size_t sent = 0; sent < bytes.size();) {
        const ssize_t n = ::send(fds_[c], bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;  // the code under test closed already
        sent += static_cast<size_t>(n);
      }
      total += bytes.size();
    }
    return total;
  }
  void send() const {
    for (size_t phase = 0; phase < phases(); ++phase) send(phase);
  }
  // Each peer ends its stream: every input ends the exchange, so the code under test must
  // finish without waiting for a deadline.
  void end() const {
    for (int fd : fds_) ::shutdown(fd, SHUT_WR);
  }

  std::vector<Link> links;  // [connection]: the ends for the code under test, which owns them

 private:
  // libFuzzer's -timeout alarm interrupts system calls every second: a connect it interrupts
  // goes on by itself, and is waited for.
  static bool connect_to(int fd, const sockaddr_in& addr) {
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) return true;
    if (errno != EINTR) return false;
    pollfd pfd{fd, POLLOUT, 0};
    while (::poll(&pfd, 1, -1) < 0 && errno == EINTR) {
    }
    int error = 0;
    socklen_t len = sizeof(error);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len);
    errno = error;
    return error == 0;
  }

  const PeerStreams& streams_;
  std::vector<int> fds_;
  int free_fd_ = -1;
};

// Runs wait(deadline), which returns or throws CollectiveError. Every peer ends its stream,
// so one that runs into the deadline (the wait's own TimeoutError, not a peer's abort that
// says it timed out) missed the end: a hang in production. It crashes, so that libFuzzer keeps
// the input.
template <typename Wait>
void wait_for_the_end(Wait wait) {
  const Deadline deadline = deadline_after(kWaitSeconds);
  try {
    wait(deadline);
  } catch (const CollectiveError& e) {
    if (Clock::now() < deadline) return;  // refused what the peers sent: the expected end
    std::fprintf(stderr, "fuzz: a wait ran into its deadline after the peers had ended their streams: %s\n",
                 e.what());
    std::abort();
  }
}

}  // namespace fuzz
}  // namespace collectives
