// How a rank that waits on memory it shares with the ranks of its host spends the time before
// it sleeps: spinning, since the others usually answer within a scheduling round, and yielding
// its core while it spins where the host's ranks outnumber the cores (as MPI's
// yield_when_idle), since the rank it waits on may need that core.
#pragma once

#include <sched.h>

#include <chrono>

namespace collectives {

// Long enough for a small message's round trip on one host, short enough that an idle rank
// costs nothing.
constexpr auto kShmWaitSpin = std::chrono::microseconds(200);

// Whether `local_ranks` ranks outnumber the cores this process may run on.
inline bool ranks_outnumber_cores(int local_ranks) {
  cpu_set_t cores;
  return sched_getaffinity(0, sizeof(cores), &cores) != 0 || local_ranks > CPU_COUNT(&cores);
}

}  // namespace collectives
