// The two failures a collective can end in; the bindings map them to collectives.CollectiveError
// and collectives.TimeoutError.
#pragma once

#include <chrono>
#include <stdexcept>
#include <string>

namespace collectives {

class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class TimeoutError : public CollectiveError {
 public:
  using CollectiveError::CollectiveError;
};

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

inline Deadline deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(seconds));
}

}  // namespace collectives
