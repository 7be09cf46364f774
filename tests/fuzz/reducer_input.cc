// Fuzz target: the reducer's input, what its workers send (ReductionServer::serve's reading
// side: FrameReader, on_header, on_frame; reduction_server/server.h has the protocol). The
// input format is in fuzz_input.h.
//  - Raw: one worker's bytes, under none straight into the parser (headers of every shape,
//    lengths, kinds, dtypes and ops, chunks beyond a worker's share, truncation) and from
//    there into slots, sums and answers; under mac or aead into the integrity check.
//  - Framed: two workers, so that chunks meet others' (disagreement, duplicates, sums of two,
//    goodbyes and aborts while chunks are pending), each frame authentic under mac and aead.
//    Before each phase after the first, the workers wait until the reducer has read what they
//    sent and answered it: a goodbye can come after the sums, as in a job.
// Heartbeats, which depend on time rather than input, are left to the unit tests. Whatever the
// workers send, serve() must return or throw CollectiveError once their streams end: never
// crash, hang (libFuzzer's -timeout), leak memory (LeakSanitizer) or descriptors.
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "fuzz_input.h"
#include "reduction_server/server.h"

using namespace collectives;

namespace {

// Long enough for the pool to sum an input's chunks, short enough for many inputs a second.
constexpr int kQuietMillis = 2;

// What the reducer sends the workers, read and dropped.
class Answers {
 public:
  explicit Answers(const fuzz::Peers& peers) {
    for (int c = 0; c < peers.size(); ++c) fds_.push_back({peers.fd(c), POLLIN, 0});
  }
  // Until the reducer has read `sent` bytes, or stopped reading (it failed, or returned), then
  // until it has sent nothing for kQuietMillis.
  void wait(const ReductionServer& server, uint64_t sent, const std::atomic<bool>& served) {
    const Deadline deadline = deadline_after(fuzz::kWaitSeconds);
    while (server.stats().bytes_received < sent && !served && !ended() && Clock::now() < deadline) read(1);
    while (read(kQuietMillis)) {
    }
  }

 private:
  // Whether anything came within `millis`.
  bool read(int millis) {
    const int ready = ::poll(fds_.data(), fds_.size(), millis);
    if (ready < 0 && errno == EINTR) return true;  // libFuzzer's -timeout alarm
    char sink[4096];
    for (pollfd& pfd : fds_) {
      if (pfd.fd >= 0 && pfd.revents != 0 && ::recv(pfd.fd, sink, sizeof(sink), MSG_DONTWAIT) == 0) {
        pfd.fd = -1;  // the reducer ended this stream: poll ignores it from here on
      }
    }
    return ready > 0;
  }
  bool ended() const {
    for (const pollfd& pfd : fds_) {
      if (pfd.fd >= 0) return false;
    }
    return true;
  }

  std::vector<pollfd> fds_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::PeerStreams streams = fuzz::peer_streams(data, size, 2);
  const int workers = streams.framed ? 2 : 1;
  fuzz::Peers peers(streams, workers);
  ReducerOptions options;
  options.threads = 1;
  // Small, so that chunks beyond a worker's share are within an input's reach.
  options.max_memory_bytes = 1 << 20;
  std::vector<std::string> names = {"worker 0", "worker 1"};
  names.resize(workers);
  ReductionServer server(peers.links, names, options);
  std::atomic<bool> served{false};
  // Anything but CollectiveError escaping serve() ends the run (std::terminate): a crash.
  std::thread serving([&] {
    try {
      server.serve();
    } catch (const CollectiveError&) {
      // The reducer refused what it was sent, and told the workers why: the expected end.
    }
    served = true;
  });
  Answers answers(peers);
  uint64_t sent = 0;
  for (size_t phase = 0; phase < peers.phases(); ++phase) {
    if (phase > 0) answers.wait(server, sent, served);
    sent += peers.send(phase);
  }
  peers.end();
  serving.join();
  return 0;
}
