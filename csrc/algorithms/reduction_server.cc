// All-reduce through reducers: each worker sends every chunk of its buffer once, to the
// reducer that owns it, and receives the chunk's sum once (protocol in
// reduction_server/server.h). Chunks to all reducers are in flight at once, so a worker sends
// chunk k+1 while chunk k is being summed and its sum comes back.
//
// Recovery. A reducer that fails takes with it the chunks it had not answered, and it may have
// answered a chunk to some workers and not to others. So after the exchange the workers agree,
// over their own mesh, on three things: which reducers failed for anyone, which chunks someone
// lacks, and who has each of those. A chunk that some worker has is broadcast from the lowest
// such rank (the sum is the same bit for bit wherever it was computed); a chunk nobody has is
// sent again to a surviving reducer. Then they agree again, until nobody lacks anything; so no
// worker returns before every worker holds every sum, and no sum is lost or wrong.
#include <algorithm>

#include "algorithms/algorithm.h"
#include "reduction_server/client.h"

namespace collectives {
namespace {

// Defaults, measured on the emulated cluster (benchmarks/RESULTS.md, issue 4).
constexpr size_t kDefaultChunkBytes = 1 << 20;
constexpr int kDefaultInflight = 4;
// Units of the agreement messages: agreement a uses kUnitsPerAgreement * a onwards, one
// per dissemination round (at most 32 rounds for 2^32 workers).
constexpr uint32_t kUnitsPerAgreement = 32;

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

}  // namespace

void allreduce_reduction_server(const AlgorithmContext& ctx, ReducerChannels& reducers,
                                const ReductionServerSettings& settings, void* data,
                                size_t count) {
  if (count == 0) return;
  const size_t element = element_size(ctx.tag.dtype);
  const int workers = ctx.size();
  const int num_reducers = reducers.count();
  char* bytes = static_cast<char*>(data);

  /*
   * Chunk c spans elements [c * chunk_elems, min((c + 1) * chunk_elems, count)). A chunk holds
   * at most chunk_bytes, and a buffer of at least R elements has at least R chunks, so that
   * every reducer shares the load. Chunk c goes to reducer alive[(c + seq) % alive.size()]:
   * consecutive chunks to consecutive reducers, rotated by the sequence number so that
   * all-reduces of one chunk spread over all reducers too. Every worker computes the same
   * plan: alive() only changes at the agreements below.
   */
  const size_t chunk_bytes = settings.chunk_bytes ? settings.chunk_bytes : kDefaultChunkBytes;
  size_t chunk_elems = std::max<size_t>(1, chunk_bytes / element);
  const size_t initially_alive = reducers.alive().size();
  if (initially_alive > 0) chunk_elems = std::min(chunk_elems, ceil_div(count, initially_alive));
  const size_t chunks = ceil_div(count, chunk_elems);
  auto offset = [&](size_t c) { return c * chunk_elems; };
  auto length = [&](size_t c) { return std::min(chunk_elems, count - offset(c)); };
  const int inflight = settings.inflight > 0 ? settings.inflight : kDefaultInflight;

  std::vector<bool> have(chunks, false);
  auto reduce_on_reducers = [&](const std::vector<size_t>& which) {
    const std::vector<int> alive = reducers.alive();
    std::vector<ShardTransfer> transfers;
    for (size_t c : which) {
      ShardTransfer t;
      t.reducer = alive[(c + ctx.tag.seq) % alive.size()];
      t.header = ctx.tag.header(static_cast<uint32_t>(c), length(c) * element);
      t.data = bytes + offset(c) * element;
      transfers.push_back(t);
    }
    ctx.log("sending " + std::to_string(which.size()) + " chunk(s) to " +
            std::to_string(alive.size()) + " reducer(s)");
    reducers.exchange(
        transfers, inflight, settings.heartbeat_timeout, ctx.deadline,
        [&] { return ctx.transport.failure(); }, [&](const std::string& event) { ctx.note(event); });
    for (const auto& t : transfers) {
      if (t.state == ShardTransfer::State::kDone) have[t.header.unit] = true;
    }
  };

  std::vector<size_t> all(chunks);
  for (size_t c = 0; c < chunks; ++c) all[c] = c;
  if (initially_alive > 0) reduce_on_reducers(all);

  for (uint32_t attempt = 0;; ++attempt) {
    /*
     * The agreement, an element-wise max over workers:
     *   [0, R)         1 where a reducer failed for this worker;
     *   [R, R+C)       1 where this worker lacks chunk c;
     *   [R+C, R+2C)    workers - rank where this worker has chunk c, else 0: the max names
     *                  the lowest rank that has it (0: nobody has it).
     */
    const size_t lacks = num_reducers, givers = num_reducers + chunks;
    std::vector<uint32_t> votes(num_reducers + 2 * chunks, 0);
    std::vector<bool> alive_here(num_reducers, false);
    for (int r : reducers.alive()) alive_here[r] = true;
    for (int r = 0; r < num_reducers; ++r) votes[r] = alive_here[r] ? 0 : 1;
    for (size_t c = 0; c < chunks; ++c) {
      votes[lacks + c] = have[c] ? 0 : 1;
      votes[givers + c] = have[c] ? static_cast<uint32_t>(workers - ctx.rank()) : 0;
    }
    agree_max(ctx, votes.data(), votes.size(), attempt * kUnitsPerAgreement);

    for (int r = 0; r < num_reducers; ++r) {
      if (votes[r] && alive_here[r]) {
        ctx.note(reducers.name(r) + " failed for another worker: this worker stops using it too");
        reducers.abandon(r);
      }
    }
    std::vector<size_t> from_peers, from_reducers;
    for (size_t c = 0; c < chunks; ++c) {
      if (!votes[lacks + c]) continue;
      (votes[givers + c] ? from_peers : from_reducers).push_back(c);
    }
    if (from_peers.empty() && from_reducers.empty()) return;
    ctx.note("recovering: " + std::to_string(from_peers.size()) +
             " chunk(s) from the workers that have them, " + std::to_string(from_reducers.size()) +
             " chunk(s) summed again by " + std::to_string(reducers.alive().size()) +
             " surviving reducer(s)");

    for (size_t c : from_peers) {
      AlgorithmContext share = ctx;
      const int root = workers - static_cast<int>(votes[givers + c]);
      share.tag.kind = CollectiveKind::kBroadcast;
      share.tag.root = static_cast<uint32_t>(root);
      broadcast_chain(share, bytes + offset(c) * element, length(c), root);
      have[c] = true;
    }
    if (from_reducers.empty()) continue;
    if (!reducers.alive().empty()) {
      reduce_on_reducers(from_reducers);
    } else if (settings.fallback_ring) {
      ctx.note("no reducer is left: finishing " + std::to_string(from_reducers.size()) +
               " chunk(s) on the ring (COLLECTIVES_RS_FALLBACK=ring)");
      for (size_t c : from_reducers) {
        allreduce_ring(ctx, bytes + offset(c) * element, length(c));
        have[c] = true;
      }
    } else {
      throw CollectiveError("all " + std::to_string(num_reducers) +
                            " reducers failed (the log above says how); set "
                            "COLLECTIVES_RS_FALLBACK=ring to finish on the ring instead");
    }
  }
}

}  // namespace collectives
