// All-reduce through reducers: each worker sends every chunk of its buffer once, to the
// reducer that owns it, and receives the chunk's sum once (protocol in
// reduction_server/server.h). Chunks to all reducers are in flight at once, so a worker sends
// chunk k+1 while chunk k is being summed and its sum comes back, and the communicator posts
// the next all-reduce's chunks before this one has finished.
//
// Recovery. A reducer that fails takes with it the chunks it had not answered, and it may have
// answered a chunk to some workers and not to others. So after the exchange the workers agree,
// over their own mesh, on three things: which reducers failed for anyone, which chunks someone
// lacks, and who has each of those. A chunk that some worker has is broadcast from the lowest
// such rank (the sum is the same bit for bit wherever it was computed); a chunk nobody has is
// sent again to a surviving reducer. Then they agree again, until nobody lacks anything; so no
// worker returns before every worker holds every sum, and no sum is lost or wrong.
//
// Partitions. A reducer may fail for one worker only (their link is cut) and stay alive for
// the others, who would then wait on it until the collective's deadline: it waits for the
// cut-off worker's chunks, and keeps sending them heartbeats. So a worker that lost a reducer
// by itself tells the others over the mesh (a notice, sent before its agreement messages), and
// a worker waiting on reducers drops each reducer it hears of, says goodbye to it, and goes
// on to the agreement, where the lost chunks are recovered as for a reducer that died.
#include "algorithms/reduction_server.h"

#include <algorithm>
#include <cstdio>

#include "algorithms/allreduce_ring.h"

namespace collectives {
namespace {

// Defaults, measured on the emulated cluster (benchmarks/RESULTS.md, issue 4). A reducer
// returns a chunk's sum only once the chunk has come in whole from every worker, and the R
// chunks in flight share a worker's link: so the first sums come back after about
// R * chunk / B, and the link waits about as long for the last ones. Cutting each reducer's
// share into kChunksPerReducer chunks keeps those waits near 1% of the transfer: at 64 MiB,
// 32-64K chunks reached 95-97% of the bound where 256K reached 88-94% and 1M 91%. The floor
// keeps the per-frame costs small.
constexpr size_t kChunksPerReducer = 256;
constexpr size_t kMinChunkBytes = 32 << 10, kMaxChunkBytes = 4 << 20;
// Unanswered chunks per reducer, by default: 4, but at most kMaxChunksInFlight over all the
// reducers together, since a worker's link carries all of them. 64 in flight lost to 32:
// 8 + 8 at 250 Mbit/s reached 91.9% of the bound with 8 per reducer, 95.3% with 4; 16 + 16 at
// 125 Mbit/s 94.7% with 4, 97.2% with 2 (benchmarks/RESULTS.md).
constexpr int kDefaultInflight = 4;
constexpr size_t kMaxChunksInFlight = 32;

int default_inflight(size_t reducers) {
  return static_cast<int>(std::clamp<size_t>(kMaxChunksInFlight / std::max<size_t>(reducers, 1), 1, kDefaultInflight));
}
// Units of the agreement messages: agreement a uses kUnitsPerAgreement * a onwards, one
// per dissemination round (at most 32 rounds for 2^32 workers).
constexpr uint32_t kUnitsPerAgreement = 32;

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

/*
 * Chunk c spans elements [c * chunk_elems, min((c + 1) * chunk_elems, count)). A chunk holds at
 * most chunk_bytes, and a buffer of at least R elements has at least R chunks, so that every
 * reducer shares the load. Chunk c goes to reducer view[(c + seq) % view.size()]: consecutive
 * chunks to consecutive reducers, rotated by the sequence number so that all-reduces of one
 * chunk spread over all reducers too.
 */
size_t chunk_elements(const ReductionServerSettings& settings, DataType dtype, size_t count,
                      size_t reducers) {
  const size_t element = element_size(dtype);
  const size_t chunk_bytes =
      settings.chunk_bytes ? settings.chunk_bytes
                           : std::clamp(count * element / (kChunksPerReducer * std::max<size_t>(1, reducers)),
                                        kMinChunkBytes, kMaxChunkBytes);
  const size_t elems = std::max<size_t>(1, chunk_bytes / element);
  return reducers > 0 ? std::min(elems, ceil_div(count, reducers)) : elems;
}

ShardBatchHandle post_chunks(const CollectiveTag& tag, ReducerChannels& reducers,
                             const std::vector<int>& view, char* bytes, size_t count,
                             size_t chunk_elems, const std::vector<size_t>& which) {
  const size_t element = element_size(tag.dtype);
  std::vector<ShardTransfer> transfers;
  for (size_t c : which) {
    ShardTransfer t;
    t.reducer = view[(c + tag.seq) % view.size()];
    const size_t first = c * chunk_elems, length = std::min(chunk_elems, count - first);
    t.header = tag.header(static_cast<uint32_t>(c), length * element);
    t.data = bytes + first * element;
    transfers.push_back(t);
  }
  return reducers.post(std::move(transfers));
}

}  // namespace

ReductionServerAllreduce::ReductionServerAllreduce(std::vector<Link> links,
                                                   std::vector<std::string> names,
                                                   const ReductionServerSettings& settings, int rank)
    : settings_(settings),
      channels_([&] {
        const int inflight = settings.inflight > 0 ? settings.inflight : default_inflight(links.size());
        return ReducerChannels(std::move(links), std::move(names), inflight, settings.heartbeat_timeout,
                               [rank](const std::string& event) {
                                 std::fprintf(stderr, "[collectives rank %d] %s\n", rank, event.c_str());
                               });
      }()) {}

class ReductionServerAllreduce::Call : public AllreduceCall {
 public:
  Call(ReductionServerAllreduce& server, const CollectiveTag& tag, void* data)
      : server_(server), tag_(tag), bytes_(static_cast<char*>(data)), number_(server.calls_++) {}

  bool waits_to_start() const override { return !started_; }
  bool start() override;
  void run(const AlgorithmContext& ctx) override;
  void succeeded() override;

 private:
  ReductionServerAllreduce& server_;
  ReducerChannels& reducers() { return server_.channels_; }
  const CollectiveTag tag_;
  char* const bytes_;
  const int64_t number_;
  bool started_ = false;
  ShardBatchHandle batch_;  // null when there was nothing to send
  size_t chunk_elems_ = 0;
  std::vector<int> view_;    // the reducers the chunks were assigned over
  std::vector<int> agreed_;  // after run(): the reducers every worker still uses
};

std::unique_ptr<AllreduceCall> ReductionServerAllreduce::call(const CollectiveTag& tag, void* data) {
  return std::make_unique<Call>(*this, tag, data);
}

/*
 * Call i is assigned over the reducers that call i-2 ended with by agreement (all of them for
 * the first two). Every worker knows that set by the time it may start call i, which is as
 * soon as i-1 is running, since i-2 has then finished; so a worker starts one call ahead, and
 * every worker's chunks still go to the same reducers. A reducer that failed meanwhile loses
 * the chunks posted to it, and the call recovers them in run(). (The communicator holds back a
 * call whose buffer an earlier unfinished collective reads or writes.)
 */
bool ReductionServerAllreduce::Call::start() {
  if (started_) return true;
  if (number_ > server_.finished_ + 1) return false;
  if (number_ < 2) {
    for (int r = 0; r < reducers().count(); ++r) view_.push_back(r);
  } else {
    view_ = server_.views_.at(number_ - 2);
  }
  started_ = true;
  const size_t count = tag_.count;
  chunk_elems_ = chunk_elements(server_.settings_, tag_.dtype, count, view_.size());
  if (count == 0 || view_.empty()) return true;
  std::vector<size_t> all(ceil_div(count, chunk_elems_));
  for (size_t c = 0; c < all.size(); ++c) all[c] = c;
  batch_ = post_chunks(tag_, reducers(), view_, bytes_, count, chunk_elems_, all);
  return true;
}

void ReductionServerAllreduce::Call::succeeded() {
  server_.views_[number_] = agreed_;
  server_.views_.erase(server_.views_.begin(), server_.views_.lower_bound(number_ - 1));
  server_.finished_ = number_ + 1;
}

// Waits for the sums, agrees with the other workers on what is missing anywhere, and recovers
// it; returns once every worker holds every sum.
void ReductionServerAllreduce::Call::run(const AlgorithmContext& ctx) {
  agreed_ = view_;
  const size_t count = tag_.count;
  if (count == 0) return;
  const size_t element = element_size(ctx.tag.dtype);
  const int workers = ctx.size();
  ReducerChannels& reducers = this->reducers();
  const ReductionServerSettings& settings = server_.settings_;
  const int num_reducers = reducers.count();
  char* bytes = bytes_;
  const size_t chunk_elems = chunk_elems_;
  const size_t chunks = ceil_div(count, chunk_elems);
  auto offset = [&](size_t c) { return c * chunk_elems; };
  auto length = [&](size_t c) { return std::min(chunk_elems, count - offset(c)); };
  // While waiting on the reducers: news of reducers the other workers lost, and their failure.
  auto watch = [&] {
    for (const PeerNotice& notice : ctx.transport.take_notices()) {
      if (notice.about >= static_cast<uint32_t>(num_reducers)) continue;  // about nothing we know
      reducers.abandon(static_cast<int>(notice.about),
                       "failed for " + ctx.transport.peer_name(notice.from) + ": it " + notice.text +
                           "; this worker stops using it too");
    }
    return ctx.transport.failure().reason;
  };

  std::vector<bool> have(chunks, false);
  auto collect = [&](const ShardBatchHandle& batch) {
    if (!batch) return;
    if (!reducers.wait(batch, ctx.deadline, watch)) {
      /*
       * The workers the reducers wait for may include one that is still inside an earlier
       * collective, waiting there on the worker that really stopped (the workers leave the
       * agreement below at different rounds, so this one may have gone on while it could
       * not): only the ends of those waits are named.
       */
      std::vector<int> awaited = reducers.awaited_workers();
      awaited.erase(std::remove(awaited.begin(), awaited.end(), ctx.rank()), awaited.end());
      const std::vector<StalledPeer> stalled = ctx.transport.trace_stall(awaited);
      if (!reducers.wait(batch, Clock::now(), watch)) {  // throws if the job failed meanwhile
        std::string culprits;
        std::vector<int> ranks;
        for (const StalledPeer& s : stalled) {
          culprits += (culprits.empty() ? "" : "; ") + ctx.transport.describe(s);
          ranks.push_back(s.rank);
        }
        throw TimeoutError("timed out waiting for sums: " + (culprits.empty() ? "" : culprits + ": ") +
                           reducers.describe_waits(ranks));
      }
    }
    for (const auto& t : batch->transfers) {
      if (t.state == ShardTransfer::State::kDone) have[t.header.unit] = true;
    }
  };
  collect(batch_);

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
    // Every loss voted for is announced first, to the workers that may still wait on it.
    for (const auto& [r, why] : reducers.take_losses()) ctx.transport.notify(static_cast<uint32_t>(r), why);
    for (int r = 0; r < num_reducers; ++r) votes[r] = alive_here[r] ? 0 : 1;
    for (size_t c = 0; c < chunks; ++c) {
      votes[lacks + c] = have[c] ? 0 : 1;
      votes[givers + c] = have[c] ? static_cast<uint32_t>(workers - ctx.rank()) : 0;
    }
    agree_max(ctx, votes.data(), votes.size(), attempt * kUnitsPerAgreement);

    // From here on, the reducers in use are those that no worker has lost: the same set on
    // every worker, whatever each one's progress thread has seen since it voted.
    agreed_.clear();
    for (int r = 0; r < num_reducers; ++r) {
      if (!votes[r]) agreed_.push_back(r);
      if (votes[r] && alive_here[r]) {
        reducers.abandon(r, "failed for another worker: this worker stops using it too");
      }
    }
    std::vector<size_t> from_peers, from_reducers;
    for (size_t c = 0; c < chunks; ++c) {
      if (!votes[lacks + c]) continue;
      (votes[givers + c] ? from_peers : from_reducers).push_back(c);
    }
    if (from_peers.empty() && from_reducers.empty()) return;
    const std::vector<int>& survivors = agreed_;
    ctx.note("recovering: " + std::to_string(from_peers.size()) +
             " chunk(s) from the workers that have them, " + std::to_string(from_reducers.size()) +
             " chunk(s) summed again by " + std::to_string(survivors.size()) +
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
    if (!survivors.empty()) {
      collect(post_chunks(ctx.tag, reducers, survivors, bytes, count, chunk_elems, from_reducers));
    } else if (settings.fallback_ring) {
      ctx.note("no reducer is left: finishing " + std::to_string(from_reducers.size()) +
               " chunk(s) on the ring (COLLECTIVES_RS_FALLBACK=ring)");
      for (size_t c : from_reducers) {
        RingAllreduce().run(ctx, bytes + offset(c) * element, length(c));
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
