// Fuzz target: a worker's channels to its reducers (ReducerChannels::read_some), fed what the
// reducers answer. The worker has sent the chunks of one all-reduce (unit u to reducer
// u % reducers); each reducer's stream begins once it has read them all, as a reducer answers
// only what it received. The input format is in fuzz_input.h.
//  - Raw: one reducer's bytes, under none straight into the parser (magic, version, kinds,
//    sums of chunks never sent, heartbeats with payloads, oversized aborts, truncation);
//    under mac or aead into the integrity check.
//  - Framed: two reducers, each frame authentic under mac and aead: sums, heartbeats and
//    abort notices interleaved, one reducer lost while the other answers.
// The wait must end, each transfer done or lost, or with CollectiveError, once the streams
// end: never crash, hang, leak memory or descriptors.
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/error.h"
#include "fuzz_input.h"
#include "reduction_server/client.h"

using namespace collectives;

namespace {

// Reads and drops `bytes` bytes of what the worker sends on `fd`; false if they do not come.
bool take(int fd, uint64_t bytes) {
  char sink[4096];
  const Deadline deadline = deadline_after(fuzz::kWaitSeconds);
  while (bytes > 0 && Clock::now() < deadline) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 100) <= 0) continue;
    const ssize_t n = ::recv(fd, sink, std::min<uint64_t>(bytes, sizeof(sink)), 0);
    if (n < 0 && errno == EINTR) continue;  // libFuzzer's -timeout alarm
    if (n <= 0) return false;
    bytes -= static_cast<uint64_t>(n);
  }
  return bytes == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::PeerStreams streams = fuzz::peer_streams(data, size, 2);
  const int reducers = streams.framed ? 2 : 1;
  fuzz::Peers peers(streams, reducers);
  std::vector<std::vector<char>> chunks(fuzz::kUnits, std::vector<char>(fuzz::kUnitBytes));
  std::vector<std::string> names = {"reducer 0", "reducer 1"};
  names.resize(reducers);
  // A heartbeat timeout beyond the wait's deadline: a worker that missed the end of a stream
  // must show as a hang, not as a reducer lost to silence.
  ReducerChannels channels(peers.links, names, fuzz::kUnits, 2 * fuzz::kWaitSeconds, [](const std::string&) {});
  const CollectiveTag tag = fuzz::reduced_allreduce();
  std::vector<ShardTransfer> transfers;
  std::vector<uint64_t> sent(reducers, 0);
  const uint64_t frame_bytes = sizeof(FrameHeader) + fuzz::kUnitBytes + (streams.security == WireSecurity::kNone ? 0 : kTagBytes);
  for (uint32_t unit = 0; unit < fuzz::kUnits; ++unit) {
    const int reducer = static_cast<int>(unit) % reducers;
    transfers.push_back({reducer, tag.header(unit, fuzz::kUnitBytes), chunks[unit].data()});
    sent[reducer] += frame_bytes;
  }
  const ShardBatchHandle batch = channels.post(std::move(transfers));
  for (int r = 0; r < reducers; ++r) {
    if (!take(peers.fd(r), sent[r])) {
      std::fprintf(stderr, "fuzz: the worker did not send its chunks to reducer %d\n", r);
      std::abort();
    }
  }
  peers.send();
  peers.end();
  fuzz::wait_for_the_end([&](Deadline deadline) { channels.wait(batch, deadline, [] { return std::string(); }); });
  return 0;
}
