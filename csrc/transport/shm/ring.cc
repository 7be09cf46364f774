#include "transport/shm/ring.h"

#include <algorithm>
#include <cstring>

namespace collectives {

// `at` is a byte count (head or tail plus an offset); masking gives its place in data_. The
// part from there to the end of data_ is copied first, the rest (if the piece wraps) from the
// start of data_.
void RingView::peek(uint64_t skip, void* into, size_t n) const {
  const uint64_t at = control_->tail.load(std::memory_order_relaxed) + skip;
  const uint64_t place = at & (capacity_ - 1);
  const size_t first = static_cast<size_t>(std::min<uint64_t>(n, capacity_ - place));
  std::memcpy(into, data_ + place, first);
  std::memcpy(static_cast<char*>(into) + first, data_, n - first);
}

void RingView::put(uint64_t skip, const void* from, size_t n) {
  const uint64_t at = control_->head.load(std::memory_order_relaxed) + skip;
  const uint64_t place = at & (capacity_ - 1);
  const size_t first = static_cast<size_t>(std::min<uint64_t>(n, capacity_ - place));
  std::memcpy(data_ + place, from, first);
  std::memcpy(data_, static_cast<const char*>(from) + first, n - first);
}

}  // namespace collectives
