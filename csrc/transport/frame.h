// The header in front of every message on a data connection. A receiver compares it with what
// it expects before a single payload byte reaches user memory, so ranks that disagree on a
// collective (length, dtype, op, order) fail with a message instead of corrupting a sum.
#pragma once

#include <cstdint>
#include <string>

#include "common/types.h"

namespace collectives {

constexpr uint32_t kFrameMagic = 0x54434c43;  // "CLCT" in little-endian byte order
// Bumped whenever the header or a collective's message schedule changes. Must equal
// collectives._handshake.PROTOCOL_VERSION, which refuses peers of another version at connect.
constexpr uint16_t kProtocolVersion = 7;
// An abort frame carries a reason of at most this many bytes; larger ones are refused.
constexpr uint64_t kMaxAbortReason = 4096;
// A UCX worker address (kUcxAddress): some hundred bytes over TCP and shared memory, more with
// several RDMA devices.
constexpr uint64_t kMaxUcxAddress = 64 << 10;

// kGoodbye: the sender closed its communicator; it will send nothing more, and the end of
// its stream that follows is not a failure. kAbort: the sender failed; the payload says why.
// kHeartbeat: a reducer is alive (it sends them while a worker waits on it, so that a silent
// reducer can be told from a slow job), and what it waits for (reduction_server/heartbeat.h).
// kNotice: news between workers that does not stop the job, taken whenever it arrives
// (`unit`: what it is about; payload: why), such as a reducer that one of them dropped.
// kStalled: the sender timed out waiting for the receiver to send, and asks what the receiver
// waits for; kWaitingOn is the answer: `root` is the rank it waits to receive from, or
// kWaitsForNobody (transport.h, trace_stall). kByReference (shared memory only): a kData
// message whose payload stays in the sender's memory, at the address that follows the header,
// for the receiver to copy from there. kGroups (worker to reducer, once, before any data):
// which workers contribute to which chunks (reduction_server/server.h).
enum class FrameKind : uint8_t {
  kData = 0, kAbort = 1, kGoodbye = 2, kHeartbeat = 3, kNotice = 4, kStalled = 5, kWaitingOn = 6, kByReference = 7,
  kGroups = 8, kUcxAddress = 9
};
constexpr uint32_t kWaitsForNobody = UINT32_MAX;

// Which collective a frame belongs to; part of the header so that ranks issuing different
// collectives at the same sequence number are caught.
enum class CollectiveKind : uint8_t {
  kAllreduce = 0,
  kAllgather = 1,
  kBroadcast = 2,
  kReduceScatter = 3,
  kBarrier = 4,
  // Point to point: `root` carries the message's tag, `comm` the lane of that tag on its
  // communicator, `seq` the message's number among those from the sender to the receiver on
  // that lane.
  kSendRecv = 5,
  kAlltoall = 6,  // `count`: the elements of that pair's message (uneven splits)
  kReduce = 7,    // rooted: `root` is the root
  kGather = 8,
  kScatter = 9,
};
constexpr uint8_t kLastCollectiveKind = 9;
const char* to_string(CollectiveKind kind);

#pragma pack(push, 1)
struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  uint8_t kind = static_cast<uint8_t>(FrameKind::kData);
  uint8_t collective = 0;
  uint8_t dtype = 0;
  uint8_t op = 0;
  uint32_t root = 0;    // a rooted collective's root, a message's tag (0 for other collectives)
  uint32_t unit = 0;    // position of this message in the collective's schedule
  uint64_t seq = 0;     // the collective's sequence number on this communicator
  uint64_t comm = 0;    // the communicator, among those sharing a transport (0: the world)
  uint64_t count = 0;   // the collective's element count (as the sender was called)
  uint64_t nbytes = 0;  // payload bytes that follow
};
#pragma pack(pop)
static_assert(sizeof(FrameHeader) == 50, "the wire format is 50 bytes");

// What a collective's messages have in common; units and sizes vary per message.
struct CollectiveTag {
  CollectiveKind kind;
  uint64_t seq;
  uint64_t count;
  DataType dtype;
  ReduceOp op;
  uint32_t root = 0;
  uint64_t comm = 0;  // FrameHeader::comm

  FrameHeader header(uint32_t unit, uint64_t nbytes) const;
  // "allreduce #7 (sum, 1000 x float32)"
  std::string describe() const;
};

// "allreduce #7 (sum, 1000 x float32)" for a header that came off the wire; values out of
// range are printed as numbers rather than trusted.
std::string describe(const FrameHeader& header);

// Empty when `got` is exactly the message that was expected; otherwise why it is not.
std::string mismatch(const FrameHeader& expected, const FrameHeader& got);

}  // namespace collectives
