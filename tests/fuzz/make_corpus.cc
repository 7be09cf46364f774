// Writes the seed corpora of the C++ fuzz targets (a few valid exchanges each, in the input
// format of fuzz_input.h) into DIR/<target>/. The files are committed; run it again when the
// wire format or a target's expectations change:
//   build/fuzz/fuzz_make_corpus tests/fuzz/corpus
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "reduction_server/heartbeat.h"

using namespace collectives;
using namespace collectives::fuzz;

namespace {

// A raw frame (no connection byte, no tag).
std::string frame(const FrameHeader& header, const std::string& payload = "") {
  return std::string(reinterpret_cast<const char*>(&header), sizeof(header)) + payload;
}

// One framed record (fuzz_input.h): a frame on `connection` (with kPause: in a new phase).
std::string record(int connection, const FrameHeader& header, const std::string& payload) {
  return std::string(1, static_cast<char>(connection)) + frame(header, payload);
}

// ... whose payload is a chunk's, all `fill` bytes.
std::string record(int connection, const FrameHeader& header, char fill = 1) {
  return record(connection, header, std::string(header.nbytes, fill));
}

FrameHeader control(FrameKind kind, uint64_t nbytes = 0, uint8_t op = 0) {
  FrameHeader header;
  header.kind = static_cast<uint8_t>(kind);
  header.nbytes = nbytes;
  header.op = op;
  return header;
}

std::string control_record(int connection, FrameKind kind, const std::string& text, uint8_t op = 0) {
  return record(connection, control(kind, text.size(), op), text);
}

std::string mode(WireSecurity security, bool framed) { return std::string(1, static_cast<char>(mode_byte(security, framed))); }

void write(const std::string& dir, const std::string& name, const std::string& bytes) {
  ::mkdir(dir.substr(0, dir.rfind('/')).c_str(), 0755);
  ::mkdir(dir.c_str(), 0755);
  if (!(std::ofstream(dir + "/" + name, std::ios::binary) << bytes)) {
    std::fprintf(stderr, "cannot write %s/%s\n", dir.c_str(), name.c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  const auto none = WireSecurity::kNone, mac = WireSecurity::kMac, aead = WireSecurity::kAead;
  const FrameHeader goodbye = control(FrameKind::kGoodbye), heartbeat = control(FrameKind::kHeartbeat);

  // The reducer: chunks of an all-reduce of 32 float32 in two chunks, from one or two workers.
  const std::string reducer = root + "/reducer_input";
  const CollectiveTag floats{CollectiveKind::kAllreduce, 1, 32, DataType::kFloat32, ReduceOp::kSum};
  const CollectiveTag halves{CollectiveKind::kAllreduce, 2, 32, DataType::kBFloat16, ReduceOp::kAvg};
  write(reducer, "raw-none-chunks-then-goodbye", mode(none, false) + frame(floats.header(0, 64), std::string(64, 1)) +
                                                    frame(floats.header(1, 64), std::string(64, 2)) + frame(goodbye));
  write(reducer, "raw-none-heartbeat-then-abort", mode(none, false) + frame(heartbeat) +
                                                     frame(control(FrameKind::kAbort, 7), "stopped"));
  write(reducer, "framed-mac-two-workers-sum-then-goodbye", mode(mac, true) + record(0, floats.header(0, 64)) +
                                                  record(1, floats.header(0, 64)) + record(1, floats.header(1, 64)) +
                                                  record(0, floats.header(1, 64)) + record(kPause, goodbye) + record(1, goodbye));
  write(reducer, "framed-aead-two-workers-bfloat16-avg", mode(aead, true) + record(0, halves.header(0, 32)) +
                                                            record(1, halves.header(0, 32)));
  CollectiveTag ints = floats;
  ints.dtype = DataType::kInt32;
  write(reducer, "framed-none-workers-disagree", mode(none, true) + record(0, floats.header(0, 64)) +
                                                    record(1, ints.header(0, 64)));

  // The ring's transport: the messages its receives expect, on one connection or two.
  const std::string ring = root + "/ring_frames";
  const CollectiveTag expected = ring_collective();
  std::string in_order = mode(none, false), on_two = mode(mac, true);
  for (uint32_t unit = 0; unit < kUnits; ++unit) {
    in_order += frame(expected.header(unit, kUnitBytes), std::string(kUnitBytes, 3));
    on_two += record(unit % 2, expected.header(unit, kUnitBytes));
  }
  write(ring, "raw-none-every-message", in_order);
  write(ring, "framed-mac-every-message-on-two-connections", on_two);
  write(ring, "raw-mac-untagged-message", mode(mac, false) + frame(expected.header(0, kUnitBytes), std::string(kUnitBytes, 3)) +
                                              std::string(kTagBytes, 0));
  write(ring, "framed-aead-message-then-abort", mode(aead, true) + record(0, expected.header(0, kUnitBytes)) +
                                                    control_record(1, FrameKind::kAbort, "rank 1: timed out", 1));
  write(ring, "raw-none-goodbye", mode(none, false) + frame(goodbye));
  write(ring, "framed-mac-notice-then-message", mode(mac, true) + control_record(0, FrameKind::kNotice, "reducer 1 dropped") +
                                                    record(0, expected.header(0, kUnitBytes)));

  // A worker's reducer channels: the sums of the chunks it sent, heartbeats, abort notices.
  const std::string answers = root + "/reducer_answers";
  const CollectiveTag sums = reduced_allreduce();
  WaitingFor waits;  // a reducer waiting 1.5 s for rank 1's chunk 1
  waits.chunk = sums.header(1, kUnitBytes);
  waits.seconds = 1.5;
  waits.missing = 1;
  waits.ranks = {1};
  std::string one = mode(none, false) + frame(heartbeat),
              two = mode(mac, true) + record(1, waits.header(), waits.payload());
  for (uint32_t unit = 0; unit < kUnits; ++unit) {
    one += frame(sums.header(unit, kUnitBytes), std::string(kUnitBytes, 4));
    two += record(unit % 2, sums.header(unit, kUnitBytes));
  }
  write(answers, "raw-none-every-sum", one);
  write(answers, "framed-mac-every-sum-from-two-reducers", two);
  write(answers, "framed-none-sum-then-abort", mode(none, true) + record(0, sums.header(0, kUnitBytes)) +
                                                  control_record(1, FrameKind::kAbort, "worker 2 closed its connection"));
  return 0;
}
