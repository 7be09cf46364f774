#include "reduction_server/heartbeat.h"

#include <cstdio>
#include <algorithm>
#include <cstring>

namespace collectives {

FrameHeader WaitingFor::header() const {
  FrameHeader h = missing ? chunk : FrameHeader{};
  h.kind = static_cast<uint8_t>(FrameKind::kHeartbeat);
  h.nbytes = payload().size();
  return h;
}

std::string WaitingFor::payload() const {
  if (!missing) return "";
  const uint64_t micros = static_cast<uint64_t>(seconds * 1e6);
  std::string out(sizeof(micros) + sizeof(missing) + ranks.size() * sizeof(uint32_t), '\0');
  std::memcpy(&out[0], &micros, sizeof(micros));
  std::memcpy(&out[sizeof(micros)], &missing, sizeof(missing));
  std::memcpy(&out[sizeof(micros) + sizeof(missing)], ranks.data(), ranks.size() * sizeof(uint32_t));
  return out;
}

bool WaitingFor::parse(const FrameHeader& header, const std::string& payload, WaitingFor* out) {
  *out = WaitingFor{};
  if (payload.empty()) return true;
  uint64_t micros;
  const size_t fixed = sizeof(micros) + sizeof(out->missing);
  if (payload.size() < fixed || (payload.size() - fixed) % sizeof(uint32_t) != 0) return false;
  std::memcpy(&micros, payload.data(), sizeof(micros));
  std::memcpy(&out->missing, payload.data() + sizeof(micros), sizeof(out->missing));
  out->ranks.resize((payload.size() - fixed) / sizeof(uint32_t));
  // Not for no ranks: an empty vector's data() may be null, which memcpy must never get.
  if (!out->ranks.empty()) {
    std::memcpy(out->ranks.data(), payload.data() + fixed, out->ranks.size() * sizeof(uint32_t));
  }
  if (out->missing == 0 || out->ranks.size() > std::min(out->missing, kNamedRanks)) return false;
  out->chunk = header;
  out->seconds = static_cast<double>(micros) / 1e6;
  return true;
}

std::string WaitingFor::describe(double older, const std::vector<int>& culprits) const {
  std::vector<uint32_t> named;
  for (uint32_t rank : ranks) {
    if (culprits.empty() || std::count(culprits.begin(), culprits.end(), static_cast<int>(rank))) named.push_back(rank);
  }
  std::string whom;
  for (size_t i = 0; i < named.size(); ++i) {
    const bool last = i + 1 == named.size() && named.size() == missing;
    whom += std::string(i == 0 ? "" : last ? " and " : ", ") + "rank " + std::to_string(named[i]);
  }
  const uint32_t others = missing - static_cast<uint32_t>(named.size());
  if (others > 0) {
    whom += (named.empty() ? "" : " and ") + std::to_string(others) + " other worker" + (others == 1 ? "" : "s") +
            (culprits.empty() ? "" : " that wait on them");
  }
  char waited[32];
  std::snprintf(waited, sizeof(waited), "%.1f", seconds + older);
  return std::string("has waited ") + waited + " s for chunk " + std::to_string(chunk.unit) + " of " +
         collectives::describe(chunk) + " from " + whom;
}

}  // namespace collectives
