#include "transport/frame.h"

#include <sstream>

namespace collectives {

const char* to_string(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllreduce: return "allreduce";
    case CollectiveKind::kAllgather: return "allgather";
    case CollectiveKind::kBroadcast: return "broadcast";
    case CollectiveKind::kReduceScatter: return "reduce_scatter";
    case CollectiveKind::kBarrier: return "barrier";
    case CollectiveKind::kSendRecv: return "send/recv";
    case CollectiveKind::kAlltoall: return "alltoall";
    case CollectiveKind::kReduce: return "reduce";
    case CollectiveKind::kGather: return "gather";
    case CollectiveKind::kScatter: return "scatter";
  }
  return "unknown-collective";
}

FrameHeader CollectiveTag::header(uint32_t unit, uint64_t nbytes) const {
  FrameHeader h;
  h.collective = static_cast<uint8_t>(kind);
  h.dtype = static_cast<uint8_t>(dtype);
  h.op = static_cast<uint8_t>(op);
  h.root = root;
  h.unit = unit;
  h.seq = seq;
  h.comm = comm;
  h.count = count;
  h.nbytes = nbytes;
  return h;
}

std::string CollectiveTag::describe() const { return collectives::describe(header(0, 0)); }

std::string describe(const FrameHeader& h) {
  std::ostringstream out;
  if (h.collective <= kLastCollectiveKind) {
    out << to_string(static_cast<CollectiveKind>(h.collective));
  } else {
    out << "collective-" << int(h.collective);
  }
  out << " #" << h.seq << " (";
  const auto kind = static_cast<CollectiveKind>(h.collective);
  if (kind == CollectiveKind::kBroadcast || kind == CollectiveKind::kGather || kind == CollectiveKind::kScatter) {
    out << "root " << h.root;
  } else if (kind == CollectiveKind::kSendRecv) {
    out << "tag " << h.root;
  } else if (kind == CollectiveKind::kAlltoall) {
    out << "this pair's message";
  } else if (kind == CollectiveKind::kReduce && h.op < kNumReduceOps) {
    out << to_string(static_cast<ReduceOp>(h.op)) << " to root " << h.root;
  } else if (h.op < kNumReduceOps) {
    out << to_string(static_cast<ReduceOp>(h.op));
  } else {
    out << "op-" << int(h.op);
  }
  out << ", " << h.count << " x ";
  if (h.dtype < kNumDataTypes) {
    out << to_string(static_cast<DataType>(h.dtype));
  } else {
    out << "dtype-" << int(h.dtype);
  }
  out << ")";
  return out.str();
}

std::string mismatch(const FrameHeader& expected, const FrameHeader& got) {
  if (got.magic != kFrameMagic) return "a frame with a bad magic number (not a collectives peer, or a corrupted stream)";
  if (got.version != expected.version) {
    return "protocol version " + std::to_string(got.version) + ", expected " +
           std::to_string(expected.version);
  }
  if (got.comm != expected.comm || got.seq != expected.seq || got.collective != expected.collective ||
      got.count != expected.count || got.dtype != expected.dtype || got.op != expected.op ||
      got.root != expected.root) {
    return "a message of " + describe(got) + " while this rank runs " + describe(expected) +
           ": ranks must issue the same collectives, in the same order, with the same "
           "length, dtype and op";
  }
  if (got.unit != expected.unit || got.nbytes != expected.nbytes) {
    return "message " + std::to_string(got.unit) + " of " + std::to_string(got.nbytes) +
           " bytes, expected message " + std::to_string(expected.unit) + " of " +
           std::to_string(expected.nbytes) + " bytes (a different segment size setting?)";
  }
  return "";
}

}  // namespace collectives
