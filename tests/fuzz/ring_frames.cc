// Fuzz target: the ring transport's frame parsing, what a peer rank sends (TcpTransport's
// handle_readable, take_header, take_frame). The input format is in fuzz_input.h.
//  - Raw: the peer's bytes on one connection, under none straight into the parser (magic,
//    version, kinds, control frames' lengths, the header compared with the receive posted,
//    truncation); under mac or aead into the integrity check.
//  - Framed: two connections to the peer (unit u goes on connection u % 2), each frame
//    authentic under mac and aead: payloads through staging memory, aborts and goodbyes
//    between data, frames on the wrong connection.
// Receives for the first half of the units are posted before the bytes are sent, the rest
// after, so that frames which arrive first also wait parked for their receive. Every wait must
// end, complete or with CollectiveError, once the stream ends: never crash, hang, leak memory
// or descriptors.
#include <cstdint>
#include <vector>

#include "fuzz_input.h"
#include "transport/tcp_transport.h"

using namespace collectives;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::PeerStreams streams = fuzz::peer_streams(data, size, 2);
  fuzz::Peers peers(streams, streams.framed ? 2 : 1);
  std::vector<std::vector<char>> buffers(fuzz::kUnits, std::vector<char>(fuzz::kUnitBytes));
  TcpTransport transport(0, 2, {{}, peers.links}, {"rank 0", "rank 1"});
  const CollectiveTag tag = fuzz::ring_collective();
  std::vector<TransportRequest> receives;
  const auto post = [&](uint32_t unit) {
    receives.push_back(transport.recv(1, tag.header(unit, fuzz::kUnitBytes), buffers[unit].data()));
  };
  for (uint32_t unit = 0; unit < fuzz::kUnits / 2; ++unit) post(unit);
  peers.send();
  peers.end();
  for (uint32_t unit = fuzz::kUnits / 2; unit < fuzz::kUnits; ++unit) post(unit);
  fuzz::wait_for_the_end([&](Deadline deadline) {
    for (const TransportRequest& receive : receives) transport.wait(receive, deadline);
  });
  return 0;
}
