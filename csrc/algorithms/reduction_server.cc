// All-reduce through reducers (the plans: reduction_server.h; the protocol:
// reduction_server/server.h). Chunks to all reducers are in flight at once, so a worker sends
// chunk k+1 while chunk k is being summed and its sum comes back; under the flat plan the
// communicator posts the next all-reduce's chunks before this one has finished.
//
// The host plan, pipelined over the hierarchy's pieces (Hierarchy::pieces): the host's ranks
// reduce-scatter piece after piece, and each rank posts its block of a piece to the reducers as
// soon as it is reduced; then, piece after piece, it waits for the block's sums, agrees with its
// group on what is missing (below), and the host all-gathers the piece, while the later pieces
// are still on the wire.
//
// Recovery. A reducer that fails takes with it the chunks it had not answered, and it may have
// answered a chunk to some workers and not to others. So after the exchange the workers that
// share the chunks (all of them under the flat plan; the j-th ranks of the hosts under the host
// plan) agree, over their own mesh, on three things: which reducers failed for anyone, which
// chunks someone lacks, and who has each of those. A chunk that some worker has is broadcast
// from the lowest such rank (the sum is the same bit for bit wherever it was computed); a chunk
// nobody has is sent again to a surviving reducer. Then they agree again, until nobody lacks
// anything; so no worker returns before every worker holds every sum, and no sum is lost or
// wrong.
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
#include "algorithms/ring.h"

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
 * The host level's ring over [lo, hi) of the buffer (the hierarchical plan's, run_ring over the
 * host's ranks): the reduce-scatter leaves member p with block p of even_blocks(hi - lo, K)
 * summed over the host in ring order (it adds, and never divides); the all-gather brings every
 * member's block to all. `root` tells its messages apart from the other rings' of the call.
 */
void host_ring(const AlgorithmContext& host, char* bytes, size_t lo, size_t hi, bool reduce_scatter, uint32_t root) {
  std::vector<size_t> offsets = even_blocks(hi - lo, host.size());
  for (size_t& offset : offsets) offset += lo;
  AlgorithmContext ring = host;
  ring.tag.root = root;
  std::vector<RingStep> steps;
  if (reduce_scatter) {
    append_reduce_scatter_steps(ring, steps);
  } else {
    append_allgather_steps(ring, steps);
  }
  for (RingStep& step : steps) step.finalize = false;
  run_ring(ring, bytes, offsets, steps);
}

/*
 * What a worker exchanges with the reducers: its regions (the flat plan: the whole buffer; the
 * host plan: its block of each piece), each cut into chunks of chunk_elems elements (the last
 * of a region shorter), numbered across the regions: a chunk's number is its `unit`. A chunk
 * holds at most chunk_bytes, and a share of at least R elements has at least R chunks, so that
 * every reducer shares the load. The members of a group hold the same regions, so their chunks
 * line up. Chunk c of group g goes to reducer view[(c + seq + g) % view.size()]: consecutive
 * chunks to consecutive reducers, rotated by the sequence number so that all-reduces of one
 * chunk spread over all reducers too, and by the group so that the groups' first chunks do.
 */
struct Chunk {
  size_t offset;  // elements into the buffer
  size_t length;
};

size_t chunk_elements(const ReductionServerSettings& settings, DataType dtype, size_t count,
                      size_t reducers) {
  const size_t element = element_size(dtype);
  const size_t chunk_bytes =
      settings.chunk_bytes ? settings.chunk_bytes
                           : std::clamp(count * element / (kChunksPerReducer * std::max<size_t>(1, reducers)),
                                        kMinChunkBytes, kMaxChunkBytes);
  const size_t elems = std::max<size_t>(1, chunk_bytes / element);
  return reducers > 0 ? std::min(elems, std::max<size_t>(1, ceil_div(count, reducers))) : elems;
}

void append_chunks(size_t lo, size_t hi, size_t chunk_elems, std::vector<Chunk>& chunks) {
  for (size_t first = lo; first < hi; first += chunk_elems) chunks.push_back({first, std::min(chunk_elems, hi - first)});
}

ShardBatchHandle post_chunks(const CollectiveTag& tag, uint32_t group, ReducerChannels& reducers,
                             const std::vector<int>& view, char* bytes, const std::vector<Chunk>& chunks,
                             const std::vector<size_t>& which) {
  const size_t element = element_size(tag.dtype);
  std::vector<ShardTransfer> transfers;
  for (size_t c : which) {
    ShardTransfer t;
    t.reducer = view[(c + tag.seq + group) % view.size()];
    t.header = tag.header(static_cast<uint32_t>(c), chunks[c].length * element);
    t.header.root = group;
    t.data = bytes + chunks[c].offset * element;
    transfers.push_back(t);
  }
  return reducers.post(std::move(transfers));
}

std::vector<size_t> numbers(size_t first, size_t end) {
  std::vector<size_t> all(end - first);
  for (size_t c = first; c < end; ++c) all[c - first] = c;
  return all;
}

}  // namespace

std::unique_ptr<ReductionServerAllreduce::HostPlan> ReductionServerAllreduce::make_host_plan(
    const Group& group, const std::vector<std::vector<int>>& hosts, std::vector<uint32_t>* groups) {
  if (hosts.empty()) return nullptr;
  const size_t k = hosts.front().size();
  if (hosts.size() < 2 || k < 2 ||
      std::any_of(hosts.begin(), hosts.end(), [&](const std::vector<int>& h) { return h.size() != k; })) {
    throw std::invalid_argument("the reduction server's host plan needs at least 2 hosts of the same number (at "
                                "least 2) of ranks");
  }
  std::vector<int> seen(group.size(), 0);
  const std::vector<int>* mine = nullptr;
  int position = 0;
  groups->assign(group.size(), 0);
  for (const std::vector<int>& h : hosts) {
    for (size_t p = 0; p < k; ++p) {
      if (h[p] < 0 || h[p] >= group.size() || seen[h[p]]++) {
        throw std::invalid_argument("the reduction server's host plan must name every rank once");
      }
      (*groups)[h[p]] = static_cast<uint32_t>(p);
      if (h[p] != group.index()) continue;
      mine = &h;
      position = static_cast<int>(p);
    }
  }
  if (std::count(seen.begin(), seen.end(), 1) != group.size()) {
    throw std::invalid_argument("the reduction server's host plan must name every rank once");
  }
  auto ranks = [&](const std::vector<int>& indices) {
    std::vector<int> global;
    for (int index : indices) global.push_back(group.peer(index));
    return global;
  };
  std::vector<int> across;
  for (const std::vector<int>& h : hosts) across.push_back(h[position]);
  const int me = group.peer(group.index());
  return std::make_unique<HostPlan>(HostPlan{Group(ranks(*mine), me), position, Group(ranks(across), me)});
}

ReductionServerAllreduce::ReductionServerAllreduce(std::vector<Link> links,
                                                   std::vector<std::string> names,
                                                   const ReductionServerSettings& settings, const Group& group)
    : settings_(settings),
      host_(make_host_plan(group, settings.hosts, &groups_)),
      channels_([&] {
        const int inflight = settings.inflight > 0 ? settings.inflight : default_inflight(links.size());
        const int rank = group.peer(group.index());
        return ReducerChannels(std::move(links), std::move(names), inflight, settings.heartbeat_timeout,
                               [rank](const std::string& event) {
                                 std::fprintf(stderr, "[collectives rank %d] %s\n", rank, event.c_str());
                               },
                               groups_, settings.ucx);
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
  ReducerChannels& reducers() { return server_.channels_; }
  uint32_t group() const { return server_.host_ ? static_cast<uint32_t>(server_.host_->position) : 0; }
  void run_host_plan(const AlgorithmContext& ctx);
  // Waits for the sums of `batch`, of chunks [first, end).
  void collect(const AlgorithmContext& ctx, const ShardBatchHandle& batch);
  // Agrees with the group (`shared`) on the chunks [first, end) and recovers those that anyone
  // lacks; returns once every member holds all of them.
  void settle(const AlgorithmContext& ctx, const AlgorithmContext& shared, size_t first, size_t end);

  ReductionServerAllreduce& server_;
  const CollectiveTag tag_;
  char* const bytes_;
  const int64_t number_;
  bool started_ = false;
  ShardBatchHandle batch_;  // null when there was nothing to send ahead
  std::vector<Chunk> chunks_;
  std::vector<bool> have_;   // [chunk]: its sum is in place
  std::vector<int> view_;    // the reducers the chunks were assigned over
  std::vector<int> agreed_;  // after run(): the reducers every member of the group still uses
  uint32_t agreements_ = 0;  // agreements so far in this call (their units)
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
 * call whose buffer an earlier unfinished collective reads or writes.) Under the host plan the
 * chunks are sent in run(), once the host has reduced them.
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
  if (server_.host_) return true;
  append_chunks(0, tag_.count, chunk_elements(server_.settings_, tag_.dtype, tag_.count, view_.size()), chunks_);
  if (!chunks_.empty() && !view_.empty()) {
    batch_ = post_chunks(tag_, 0, reducers(), view_, bytes_, chunks_, numbers(0, chunks_.size()));
  }
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
  if (tag_.count == 0) return;
  if (server_.host_) return run_host_plan(ctx);
  have_.assign(chunks_.size(), false);
  collect(ctx, batch_);
  settle(ctx, ctx, 0, chunks_.size());
}

/*
 * Piece i of the hierarchical plan's pieces is [pieces[i], pieces[i + 1]); the host's
 * reduce-scatter leaves this rank, at place p of its host, with block p of the piece's K
 * near-equal blocks (even_blocks), summed over the host: its region of the piece. The host's
 * rings add and do not divide (op avg runs them as sum); the reducers divide by the number of
 * workers. Their messages carry 2i + 1 (reduce-scatter of piece i) or 2i + 2 (all-gather) in
 * the tag's root.
 */
void ReductionServerAllreduce::Call::run_host_plan(const AlgorithmContext& ctx) {
  const HostPlan& plan = *server_.host_;
  CollectiveTag host_tag = ctx.tag;
  if (host_tag.op == ReduceOp::kAvg) host_tag.op = ReduceOp::kSum;
  const AlgorithmContext host{ctx.transport, plan.host, host_tag, ctx.deadline, ctx.segment_bytes,
                              ctx.scratch, ctx.debug, ctx.interruption};
  const AlgorithmContext shared{ctx.transport, plan.across, ctx.tag, ctx.deadline, ctx.segment_bytes,
                                ctx.scratch, ctx.debug, ctx.interruption};
  const std::vector<size_t> pieces = Hierarchy::pieces(tag_.count, element_size(tag_.dtype));
  const size_t count = pieces.size() - 1, k = plan.host.size();
  std::vector<std::pair<size_t, size_t>> regions;
  size_t share = 0;
  for (size_t i = 0; i < count; ++i) {
    const std::vector<size_t> blocks = even_blocks(pieces[i + 1] - pieces[i], static_cast<int>(k));
    regions.emplace_back(pieces[i] + blocks[plan.position], pieces[i] + blocks[plan.position + 1]);
    share += regions.back().second - regions.back().first;
  }
  const size_t chunk_elems = chunk_elements(server_.settings_, tag_.dtype, share, view_.size());
  std::vector<size_t> first_chunk;  // [piece]: its first chunk; [count]: the end
  for (const auto& [lo, hi] : regions) {
    first_chunk.push_back(chunks_.size());
    append_chunks(lo, hi, chunk_elems, chunks_);
  }
  first_chunk.push_back(chunks_.size());
  have_.assign(chunks_.size(), false);

  std::vector<ShardBatchHandle> batches;
  for (size_t i = 0; i < count; ++i) {
    if (ctx.debug) ctx.log("reduction_server:host: piece " + std::to_string(i + 1) + "/" + std::to_string(count) +
                           ": reduce-scatter in the host, then elements " + std::to_string(regions[i].first) + "-" +
                           std::to_string(regions[i].second) + " to the reducers");
    host_ring(host, bytes_, pieces[i], pieces[i + 1], /*reduce_scatter=*/true, static_cast<uint32_t>(2 * i + 1));
    batches.push_back(view_.empty() || first_chunk[i] == first_chunk[i + 1]
                          ? nullptr
                          : post_chunks(tag_, group(), reducers(), view_, bytes_, chunks_,
                                        numbers(first_chunk[i], first_chunk[i + 1])));
  }
  for (size_t i = 0; i < count; ++i) {
    collect(ctx, batches[i]);
    settle(ctx, shared, first_chunk[i], first_chunk[i + 1]);
    if (ctx.debug) ctx.log("reduction_server:host: piece " + std::to_string(i + 1) + "/" + std::to_string(count) +
                           ": sums in, all-gather in the host");
    host_ring(host, bytes_, pieces[i], pieces[i + 1], /*reduce_scatter=*/false, static_cast<uint32_t>(2 * i + 2));
  }
}

void ReductionServerAllreduce::Call::collect(const AlgorithmContext& ctx, const ShardBatchHandle& batch) {
  if (!batch) return;
  ReducerChannels& reducers = this->reducers();
  const int num_reducers = reducers.count();
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
  if (!reducers.wait(batch, ctx.deadline, watch)) {
    /*
     * The workers the reducers wait for may include one that is still inside an earlier
     * collective, waiting there on the worker that really stopped (the workers leave the
     * agreement below at different rounds, so this one may have gone on while it could
     * not): only the ends of those waits are named.
     */
    std::vector<int> awaited = reducers.awaited_workers();
    awaited.erase(std::remove(awaited.begin(), awaited.end(), ctx.group.peer(ctx.rank())), awaited.end());
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
    if (t.state == ShardTransfer::State::kDone) have_[t.header.unit] = true;
  }
}

void ReductionServerAllreduce::Call::settle(const AlgorithmContext& ctx, const AlgorithmContext& shared,
                                            size_t first, size_t end) {
  const size_t element = element_size(ctx.tag.dtype);
  const int members = shared.size();
  ReducerChannels& reducers = this->reducers();
  const int num_reducers = reducers.count();
  const size_t chunks = end - first;
  for (;;) {
    /*
     * The agreement, an element-wise max over the group's members:
     *   [0, R)         1 where a reducer failed for this worker;
     *   [R, R+C)       1 where this worker lacks chunk first + c;
     *   [R+C, R+2C)    members - index where this worker has chunk first + c, else 0: the max
     *                  names the lowest index that has it (0: nobody has it).
     */
    const size_t lacks = num_reducers, givers = num_reducers + chunks;
    std::vector<uint32_t> votes(num_reducers + 2 * chunks, 0);
    std::vector<bool> alive_here(num_reducers, false);
    for (int r : reducers.alive()) alive_here[r] = true;
    // Every loss voted for is announced first, to the workers that may still wait on it.
    for (const auto& [r, why] : reducers.take_losses()) ctx.transport.notify(static_cast<uint32_t>(r), why);
    for (int r = 0; r < num_reducers; ++r) votes[r] = alive_here[r] ? 0 : 1;
    for (size_t c = 0; c < chunks; ++c) {
      votes[lacks + c] = have_[first + c] ? 0 : 1;
      votes[givers + c] = have_[first + c] ? static_cast<uint32_t>(members - shared.rank()) : 0;
    }
    agree_max(shared, votes.data(), votes.size(), agreements_++ * kUnitsPerAgreement);

    // From here on, the reducers in use are those that no member has lost: the same set on
    // every member, whatever each one's progress thread has seen since it voted.
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
      (votes[givers + c] ? from_peers : from_reducers).push_back(first + c);
    }
    if (from_peers.empty() && from_reducers.empty()) return;
    const std::vector<int>& survivors = agreed_;
    ctx.note("recovering: " + std::to_string(from_peers.size()) +
             " chunk(s) from the workers that have them, " + std::to_string(from_reducers.size()) +
             " chunk(s) summed again by " + std::to_string(survivors.size()) +
             " surviving reducer(s)");

    for (size_t c : from_peers) {
      AlgorithmContext share = shared;
      const int root = members - static_cast<int>(votes[givers + c - first]);
      share.tag.kind = CollectiveKind::kBroadcast;
      share.tag.root = static_cast<uint32_t>(root);
      broadcast_chain(share, bytes_ + chunks_[c].offset * element, chunks_[c].length, root);
      have_[c] = true;
    }
    if (from_reducers.empty()) continue;
    if (!survivors.empty()) {
      collect(ctx, post_chunks(ctx.tag, group(), reducers, survivors, bytes_, chunks_, from_reducers));
    } else if (server_.settings_.fallback_ring) {
      ctx.note("no reducer is left: finishing " + std::to_string(from_reducers.size()) +
               " chunk(s) on the ring (COLLECTIVES_RS_FALLBACK=ring)");
      // Under the host plan the ring adds the hosts' sums, and avg divides by every worker.
      AlgorithmContext ring = shared;
      const bool divide_here = ring.tag.op == ReduceOp::kAvg && ring.size() != ctx.size();
      if (divide_here) ring.tag.op = ReduceOp::kSum;
      for (size_t c : from_reducers) {
        char* data = bytes_ + chunks_[c].offset * element;
        RingAllreduce().run(ring, data, chunks_[c].length);
        if (divide_here) divide(data, chunks_[c].length, ctx.tag.dtype, ctx.size());
        have_[c] = true;
      }
    } else {
      throw CollectiveError("all " + std::to_string(num_reducers) +
                            " reducers failed (the log above says how); set "
                            "COLLECTIVES_RS_FALLBACK=ring to finish on the ring instead");
    }
  }
}

}  // namespace collectives
