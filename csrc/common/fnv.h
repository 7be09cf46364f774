// FNV-1a over 64-bit values, byte by byte: ids that ranks derive alike without a word
// exchanged (subgroups, point-to-point lanes, UCX tags, the board's call signatures).
#pragma once

#include <cstdint>
#include <initializer_list>

namespace collectives {

template <typename Values>
uint64_t fnv1a(const Values& values) {
  uint64_t hash = 14695981039346656037ull;
  for (uint64_t value : values) {
    for (int byte = 0; byte < 8; ++byte) hash = (hash ^ ((value >> (8 * byte)) & 0xff)) * 1099511628211ull;
  }
  return hash;
}

inline uint64_t fnv1a(std::initializer_list<uint64_t> values) { return fnv1a<std::initializer_list<uint64_t>>(values); }

}  // namespace collectives
