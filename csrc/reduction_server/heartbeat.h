// What a reducer's heartbeat says besides "alive": the oldest chunk it is still collecting,
// for how long, and which workers' contributions to it have not come. A worker that times out
// waiting for sums quotes it, so that its error names the worker that is missing (stopped,
// or cut off from this reducer) rather than only the reducer that owes the sum.
//
// On the wire (a kHeartbeat frame): the header identifies the chunk as a data frame of it
// would (collective, seq, unit, count, dtype, op); the payload is the microseconds it has
// waited (uint64), how many workers it waits for (uint32), then the ranks of the first
// kNamedRanks of them (uint32 each). An empty payload: it waits for no worker.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "transport/frame.h"

namespace collectives {

struct WaitingFor {
  static constexpr uint32_t kNamedRanks = 16;

  FrameHeader chunk;
  double seconds = 0;
  uint32_t missing = 0;          // workers whose contribution has not come (0: none)
  std::vector<uint32_t> ranks;   // the first kNamedRanks of them, ascending

  // The heartbeat frame's header (chunk's identity, kind kHeartbeat) and payload.
  FrameHeader header() const;
  std::string payload() const;
  // From a heartbeat that came off the wire; false if its payload is malformed.
  static bool parse(const FrameHeader& header, const std::string& payload, WaitingFor* out);
  // "has waited 29.8 s for chunk 3 of allreduce #7 (sum, 1000 x float32) from rank 2";
  // `older` seconds are added (the heartbeat's age). Where `culprits` is not empty, only
  // those of the missing ranks are named, and the others counted as waiting on them.
  std::string describe(double older, const std::vector<int>& culprits = {}) const;
};

}  // namespace collectives
