#include "transport/ucx/ucx_transport.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <stdexcept>
#include <utility>

#include "common/fnv.h"
#include "transport/frame_io.h"
#include "transport/wire_security.h"

namespace collectives {

// A message's first UCX message: its header, and its tag where the frames are protected (the tag
// covers the payload too, so a sender makes it before the header leaves).
#pragma pack(push, 1)
struct WireHeader {
  FrameHeader header;
  unsigned char tag[kTagBytes];
};
#pragma pack(pop)

struct UcxTransport::Operation : TransportOperation {
  char* data = nullptr;  // payload (header.nbytes bytes)
  // Guarded by mutex_:
  WireHeader wire;       // a send's header and tag as they go; a receive's, as they came
  // Protected frames: a receive's payload until its tag is checked; kAead: a send's ciphertext.
  std::vector<char> sealed;
  // A protected receive: its number on its lane, taken as its header came, and the lane's key.
  uint64_t frame = 0;
  const std::string* lane_key = nullptr;
  bool unchecked = false;  // its payload is in `sealed`: the first wait checks and copies it
  bool checking = false;   // a wait does so now
  int parts_left = 0;    // a send's UCX messages not yet done
  bool done = false;     // finished, well or not
  bool ok = false;       // every byte moved
};

struct UcxTransport::Peer {
  UcxTransport* owner = nullptr;
  int rank = 0;
  ucp_ep_h ep = nullptr;
  // Guarded by mutex_:
  uint64_t sent = 0;              // messages sent to it
  uint64_t receives_posted = 0;   // receives posted for its messages
  bool said_goodbye = false;      // then `goodbye` is the number of messages it sent this rank
  uint64_t goodbye = 0;           // its goodbye lands here
  uint64_t goodbye_to_send = 0;   // ours leaves from here
  // COLLECTIVES_WIRE_SECURITY mac or aead: each lane (communicator) of each direction has a key
  // of its own (lane_key) and counts its frames. Sending: guarded by sealing_mutex_.
  std::map<uint64_t, FrameProtection> sealing;
  struct OpeningLane {
    std::string key;
    uint64_t frames = 0;
  };
  std::map<uint64_t, OpeningLane> opening;
};

namespace {

// Control-link lane of the address exchange: no communicator's id (those are 0 or hashes).
constexpr uint64_t kAddressLane = UINT64_MAX;
constexpr uint64_t kMaxAddressBytes = 1 << 20;
// Turns of the progress loop that find nothing to do before it sleeps: a message that
// completes soon after another is taken without waking a thread.
constexpr int kSpinTurns = 64;
// How long the sleeping progress thread trusts UCX's wake-up descriptor alone, while requests
// are in flight and while not (a transport may move bytes without signalling it).
constexpr int kBusySleepMillis = 2, kIdleSleepMillis = 100;
constexpr double kGoodbyeSeconds = 10.0, kQuiesceSeconds = 10.0;

/*
 * A UCX tag, 64 bits: the part (header, payload, goodbye) in the top 2, the sender's rank in the
 * next kSenderBits, and a hash (FNV-1a) of the communicator's 64-bit id in the low kLaneBits. A
 * receive from any source masks the sender's bits out, so that UCX matches it with the first
 * header of its lane from any rank (MPI's rule: the receive posted first takes it). Two lanes
 * whose hashes collide would meet each other's headers, which mismatch() reports.
 */
constexpr int kLaneBits = 40, kSenderBits = 22;
constexpr ucp_tag_t kLaneMask = (ucp_tag_t{1} << kLaneBits) - 1;
constexpr ucp_tag_t kSenderMask = ((ucp_tag_t{1} << kSenderBits) - 1) << kLaneBits;
constexpr ucp_tag_t kWholeTag = ~ucp_tag_t{0};
constexpr ucp_tag_t kAnySenderTag = ~kSenderMask;

constexpr char kLaneKeyLabel[] = "collectives ucx lane ";

// The key of a lane of one direction: HKDF of the control link's key for that direction, so no
// (key, frame number) pair is used twice, whatever order the lanes' messages go in.
std::string lane_key(const std::string& link_key, uint64_t comm) {
  std::string label(kLaneKeyLabel);
  label.append(reinterpret_cast<const char*>(&comm), sizeof(comm));
  return derive_session_keys(link_key, label).substr(0, kSessionKeyBytes);
}

ucp_tag_t ucx_tag(uint64_t part, int sender, uint64_t comm) {
  return part << (kLaneBits + kSenderBits) | ucp_tag_t(sender) << kLaneBits | (fnv1a({comm}) & kLaneMask);
}
int sender_of(ucp_tag_t tag) { return static_cast<int>((tag & kSenderMask) >> kLaneBits); }

}  // namespace

UcxTransport::UcxTransport(int rank, int size, std::vector<std::vector<Link>> control_links,
                           std::vector<std::string> peer_names, Deadline deadline)
    : rank_(rank), size_(size), ucx_(loaded_ucx()), security_(security_of(control_links)),
      link_keys_(keys_of(control_links)),
      header_bytes_(sizeof(FrameHeader) + (security_ == WireSecurity::kNone ? 0 : kTagBytes)),
      control_(std::make_unique<TcpTransport>(rank, size, std::move(control_links), std::move(peer_names))) {
  control_->become_part_of(this);
  try {
    if (size > (1 << kSenderBits)) {
      throw CollectiveError("the UCX transport takes at most " + std::to_string(1 << kSenderBits) + " ranks");
    }
    // Large messages by zero-copy writes into the receiver's buffer, unless UCX_RNDV_SCHEME
    // says otherwise: over TCP UCX's default copies every byte into and out of bounce buffers
    // (benchmarks/RESULTS.md, issue 16), which on loopback cost 12-34% of the time. Every UCX
    // call holds mutex_.
    start_ucx_worker(ucx_, UCP_FEATURE_TAG, {{"RNDV_SCHEME", "put_zcopy"}}, &context_, &worker_, &worker_fd_);
    poller_.watch(worker_fd_, 0, EPOLLIN, this);
    peers_.resize(size);
    for (int p = 0; p < size; ++p) {
      if (p == rank) continue;
      peers_[p] = std::make_unique<Peer>();
      peers_[p]->owner = this;
      peers_[p]->rank = p;
    }
    exchange_addresses(deadline);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& peer : peers_) {
      if (peer) start_goodbye_recv(*peer);
    }
  } catch (...) {
    release_ucx();
    control_->become_part_of(nullptr);
    throw;
  }
  progress_thread_ = std::thread([this] { progress_loop(); });
}

UcxTransport::~UcxTransport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake();
  progress_thread_.join();
  say_goodbye();
  release_ucx();
  control_->become_part_of(nullptr);
  control_.reset();  // its goodbye follows the last UCX message on each link
}

/*
 * Each rank sends every peer the length of its worker address, then the address, over the
 * control links (authenticated, and with COLLECTIVES_WIRE_SECURITY=mac or aead tagged): a rank
 * connects only to the addresses its real peers gave it. Three rounds on a lane of their own:
 * lengths, addresses, and word that the endpoints are made.
 */
void UcxTransport::exchange_addresses(Deadline deadline) {
  ucp_address_t* address = nullptr;
  size_t address_bytes = 0;
  ucs_status_t status = ucx_.worker_get_address(worker_, &address, &address_bytes);
  if (status != UCS_OK) throw CollectiveError("UCX gave no worker address: " + ucx_.describe(status));
  // What each rank sends: its hostname, a NUL, its worker address.
  char hostname[256] = {};
  gethostname(hostname, sizeof(hostname) - 1);
  const std::string mine = std::string(hostname) + '\0' +
                           std::string(reinterpret_cast<const char*>(address), address_bytes);
  ucx_.worker_release_address(worker_, address);

  FrameHeader lengths_header;
  lengths_header.collective = static_cast<uint8_t>(CollectiveKind::kBarrier);
  lengths_header.comm = kAddressLane;
  lengths_header.nbytes = sizeof(uint64_t);
  const uint64_t my_length = mine.size();
  std::vector<uint64_t> lengths(size_, 0);
  std::vector<TransportRequest> requests;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    requests.push_back(control_->send(p, lengths_header, &my_length));
    requests.push_back(control_->recv(p, lengths_header, &lengths[p]));
  }
  for (const auto& request : requests) control_->wait(request, deadline);
  requests.clear();

  std::vector<std::string> addresses(size_);
  FrameHeader address_header = lengths_header;
  address_header.seq = 1;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    if (lengths[p] == 0 || lengths[p] > kMaxAddressBytes) {
      abort(peer_name(p) + " sent a UCX address of " + std::to_string(lengths[p]) + " bytes");
      failure().raise();
    }
    address_header.nbytes = mine.size();
    requests.push_back(control_->send(p, address_header, mine.data()));
    addresses[p].resize(lengths[p]);
    address_header.nbytes = lengths[p];
    requests.push_back(control_->recv(p, address_header, &addresses[p][0]));
  }
  for (const auto& request : requests) control_->wait(request, deadline);

  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const size_t end_of_name = addresses[p].find('\0');
    if (end_of_name == std::string::npos || end_of_name + 1 == addresses[p].size()) {
      abort(peer_name(p) + " sent no UCX address");
      failure().raise();
    }
    /*
     * UCX's error handling for a peer's death (UCP_ERR_HANDLING_MODE_PEER) rules out its
     * shared-memory transports, which cannot detect one. So a peer of this host is reached
     * without it, over whatever UCX finds (its shared memory, unless UCX_TLS says otherwise),
     * and its death is seen where the control link's socket ends; a peer of another host with
     * it, so that a death reaches the requests on that endpoint too.
     */
    const bool same_host = addresses[p].compare(0, end_of_name, hostname) == 0;
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.address = reinterpret_cast<const ucp_address_t*>(addresses[p].data() + end_of_name + 1);
    params.err_mode = same_host ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &UcxTransport::endpoint_failed;
    params.err_handler.arg = peers_[p].get();
    std::lock_guard<std::mutex> lock(mutex_);
    status = ucx_.ep_create(worker_, &params, &peers_[p]->ep);
    if (status != UCS_OK) {
      throw CollectiveError("UCX could not reach " + peer_name(p) + ": " + ucx_.describe(status));
    }
  }
  // Every rank holds its endpoints before any goes on: a peer that closed at once would
  // otherwise take its worker (its shared memory, its listening socket) away before a slower
  // rank reached it.
  FrameHeader ready_header = lengths_header;
  ready_header.seq = 2;
  ready_header.nbytes = 0;
  requests.clear();
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    requests.push_back(control_->send(p, ready_header, nullptr));
    requests.push_back(control_->recv(p, ready_header, nullptr));
  }
  for (const auto& request : requests) control_->wait(request, deadline);
}

TransportRequest UcxTransport::send(int peer, const FrameHeader& header, const void* data) {
  auto op = std::make_shared<Operation>();
  op->peer = peer;
  op->is_send = true;
  op->header = header;
  op->data = static_cast<char*>(const_cast<void*>(data));
  op->wire.header = header;
  Peer& to = *peers_.at(peer);
  const char* payload = op->data;
  // Sealed without mutex_, so that the progress thread moves other messages meanwhile, and
  // posted before sealing_mutex_ is let go: UCX matches a lane's messages at the peer in the
  // order they are posted, which must be the order they are numbered in.
  std::unique_lock<std::mutex> in_lane_order;
  if (security_ != WireSecurity::kNone) {
    in_lane_order = std::unique_lock<std::mutex>(sealing_mutex_);
    auto lane = to.sealing.find(header.comm);
    if (lane == to.sealing.end()) {
      lane = to.sealing.emplace(header.comm, FrameProtection(security_, lane_key(link_keys_[peer].first, header.comm)))
                 .first;
    }
    if (lane->second.encrypts()) {
      op->sealed.resize(header.nbytes);
      payload = op->sealed.data();
    }
    lane->second.seal(header, op->data, op->sealed.data(), header.nbytes, op->wire.tag);
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) {
      op->done = true;  // not ok: wait() reports the failure
      return op;
    }
    ++to.sent;
    op->parts_left = header.nbytes > 0 ? 2 : 1;
    start_send(op, Part::kHeader, &op->wire, header_bytes_);
    if (header.nbytes > 0) start_send(op, Part::kPayload, payload, header.nbytes);
  }
  wake();
  return op;
}

TransportRequest UcxTransport::recv(int peer, const FrameHeader& expected, void* data) {
  auto op = std::make_shared<Operation>();
  op->peer = peer;
  op->header = expected;
  op->data = static_cast<char*>(data);
  bool peer_gone = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Peer& from = *peers_.at(peer);
    ++from.receives_posted;
    peer_gone = !failed_ && outlived_by_receives(from);
    if (failed_ || peer_gone) {
      op->done = true;
    } else {
      start_recv(op, Part::kHeader, peer, &op->wire, header_bytes_);
    }
  }
  if (peer_gone) abort(peer_has_closed(peer_name(peer)));
  wake();
  return op;
}

TransportRequest UcxTransport::post_recv_any(std::vector<int> sources, const FrameHeader& expected, void* data) {
  auto op = std::make_shared<Operation>();
  op->peer = kAnySource;
  op->sources = std::move(sources);
  op->header = expected;
  op->data = static_cast<char*>(data);
  std::string all_gone;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) {
      op->done = true;
    } else {
      start_recv(op, Part::kHeader, kAnySource, &op->wire, header_bytes_);
      all_gone = sources_gone_locked();
    }
  }
  if (!all_gone.empty()) abort(all_gone);
  wake();
  return op;
}

void UcxTransport::start_send(const OperationPtr& op, Part part, const void* buffer, size_t bytes) {
  ucp_request_param_t param{};
  void* request = ucx_.tag_send_nbx(peers_[op->peer]->ep, buffer, bytes,
                                    ucx_tag(uint64_t(part), rank_, op->header.comm), &param);
  InFlight sending{op, part, true, op->peer, request};
  if (request == nullptr) return finished(sending, UCS_OK, bytes, op->peer);
  if (UCS_PTR_IS_ERR(request)) return finished(sending, UCS_PTR_STATUS(request), 0, op->peer);
  in_flight_.push_back(sending);
}

void UcxTransport::start_recv(const OperationPtr& op, Part part, int peer, void* buffer, size_t bytes) {
  // Never completed on the spot, even where the message is in already: receives finish in
  // reap_locked's order, the order they were posted in (a header that arrived must not post
  // its payload's receive ahead of an earlier header's).
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
  const uint64_t comm = op ? uint64_t{op->header.comm} : 0;
  const bool any_source = peer == kAnySource;
  void* request = ucx_.tag_recv_nbx(worker_, buffer, bytes, ucx_tag(uint64_t(part), any_source ? 0 : peer, comm),
                                    any_source ? kAnySenderTag : kWholeTag, &param);
  InFlight receiving{op, part, false, peer, request};
  if (UCS_PTR_IS_ERR(request)) return finished(receiving, UCS_PTR_STATUS(request), 0, peer);
  in_flight_.push_back(receiving);
}

void UcxTransport::start_goodbye_recv(Peer& peer) {
  start_recv(nullptr, Part::kGoodbye, peer.rank, &peer.goodbye, sizeof(peer.goodbye));
}

bool UcxTransport::reap_locked() {
  // In posting order, finished ones first taken out: a receive's header that arrives posts
  // its payload's receive, and payload receives of one stream must be posted in the order of
  // their headers, which UCX matched in the order posted.
  struct Done {
    InFlight entry;
    ucs_status_t status;
    size_t bytes;
    int sender;
  };
  std::vector<Done> done;
  size_t kept = 0;
  for (const InFlight& entry : in_flight_) {
    ucs_status_t status;
    size_t bytes = 0;
    int sender = entry.peer;
    if (entry.sending) {
      status = ucx_.request_check_status(entry.request);
    } else {
      ucp_tag_recv_info_t info{};
      status = ucx_.tag_recv_request_test(entry.request, &info);
      bytes = info.length;
      if (status == UCS_OK) sender = sender_of(info.sender_tag);
    }
    if (status == UCS_INPROGRESS) {
      in_flight_[kept++] = entry;
      continue;
    }
    ucx_.request_free(entry.request);
    done.push_back({entry, status, bytes, sender});
  }
  in_flight_.resize(kept);
  for (const Done& d : done) finished(d.entry, d.status, d.bytes, d.sender);
  if (done.empty()) return false;
  // After every message that arrived with them: a goodbye taken here follows its sender's last
  // header, which a receive from any source took in this pass if it could.
  const std::string all_gone = sources_gone_locked();
  if (!all_gone.empty()) fail_locked(all_gone, false);
  return true;
}

void UcxTransport::finished(const InFlight& done, ucs_status_t status, size_t bytes, int sender) {
  // After a failure nothing more starts (quiesce_locked waits for what is in flight), and the
  // failure says why a request did not finish.
  if (failed_ || status == UCS_ERR_CANCELED) return;
  if (status != UCS_OK && done.peer == kAnySource) {
    fail_locked("receiving from any of " + std::to_string(done.op->sources.size()) + " ranks over UCX failed: " +
                    ucx_.describe(status),
                false);
    return;
  }
  const std::string& who = peer_name(sender);
  if (status != UCS_OK) {
    fail_locked(std::string(done.sending ? "sending to " : "receiving from ") + who + " over UCX failed: " +
                    ucx_.describe(status),
                false);
    return;
  }
  if (done.part == Part::kGoodbye) {
    if (done.sending) return;
    Peer& peer = *peers_[done.peer];
    peer.said_goodbye = true;
    if (outlived_by_receives(peer)) fail_locked(peer_closed_mid_exchange(who), false);
    return;
  }
  Operation& op = *done.op;
  if (done.sending) {
    if (--op.parts_left == 0) complete(op);
    return;
  }
  if (done.part == Part::kPayload) {
    if (bytes != op.header.nbytes) {
      fail_locked(who + " sent a payload of " + std::to_string(bytes) + " bytes after a header of " +
                      std::to_string(op.header.nbytes),
                  false);
      return;
    }
    op.unchecked = security_ != WireSecurity::kNone;  // checked by its waiter, without mutex_
    return complete(op);
  }
  if (bytes != header_bytes_) {
    fail_locked(who + " sent a header of " + std::to_string(bytes) + " bytes", false);
    return;
  }
  if (done.peer == kAnySource) {
    // Its lane is a communicator's (and a tag's), which only the communicator's members use.
    if (std::find(op.sources.begin(), op.sources.end(), sender) == op.sources.end()) {
      fail_locked(who + " sent a message to a receive from ranks that do not include it", false);
      return;
    }
    op.peer = sender;
    Peer& from = *peers_[sender];
    ++from.receives_posted;
    if (outlived_by_receives(from)) {
      fail_locked(peer_closed_mid_exchange(who), false);  // a receive posted for it after this one waits in vain
      return;
    }
  }
  // A point-to-point message's number, as UCX matched it: in posting order among the receives
  // that could take it, per-peer ones and those from any source alike.
  matching().number(sender, op.header);
  const std::string why = mismatch(op.header, op.wire.header);
  if (!why.empty()) {
    fail_locked(who + " sent " + why + (security_ != WireSecurity::kNone ? kUncheckedHeader : ""), false);
    return;
  }
  char* into = op.data;
  if (security_ != WireSecurity::kNone) {
    auto lane = peers_[sender]->opening.find(op.header.comm);
    if (lane == peers_[sender]->opening.end()) {
      lane = peers_[sender]->opening.emplace(op.header.comm, Peer::OpeningLane{lane_key(link_keys_[sender].second, op.header.comm)}).first;
    }
    op.frame = lane->second.frames++;
    op.lane_key = &lane->second.key;
    op.sealed.resize(op.header.nbytes);
    into = op.sealed.data();
  }
  if (op.header.nbytes == 0) {
    if (authentic(op)) {
      complete(op);
    } else {
      fail_locked(integrity_failure(op), false);
    }
    return;
  }
  start_recv(done.op, Part::kPayload, sender, into, op.header.nbytes);
}

bool UcxTransport::authentic(Operation& op) const {
  return FrameProtection(security_, *op.lane_key)
      .open_numbered(op.frame, op.wire.header, op.sealed.data(), op.header.nbytes, op.wire.tag);
}

std::string UcxTransport::integrity_failure(const Operation& op) const {
  return peer_name(op.peer) + " sent a message over UCX that failed its integrity check (COLLECTIVES_WIRE_SECURITY=" +
         to_string(security_) + "): it was altered on the way, or injected by someone other than " + peer_name(op.peer);
}

std::vector<std::pair<std::string, std::string>> UcxTransport::keys_of(
    const std::vector<std::vector<Link>>& control_links) {
  std::vector<std::pair<std::string, std::string>> keys(control_links.size());
  for (size_t p = 0; p < control_links.size(); ++p) {
    if (!control_links[p].empty()) keys[p] = {control_links[p].front().send_key, control_links[p].front().recv_key};
  }
  return keys;
}

WireSecurity UcxTransport::security_of(const std::vector<std::vector<Link>>& control_links) {
  for (const auto& links : control_links) {
    if (!links.empty()) return links.front().security;
  }
  return WireSecurity::kNone;
}

void UcxTransport::complete(Operation& op) {
  op.done = true;
  op.ok = true;
  completed_.notify_all();
}

bool UcxTransport::outlived_by_receives(const Peer& peer) const {
  return peer.said_goodbye && peer.receives_posted > peer.goodbye;
}

std::string UcxTransport::sources_gone_locked() {
  for (const InFlight& entry : in_flight_) {
    if (entry.sending || entry.peer != kAnySource) continue;
    const std::vector<int>& sources = entry.op->sources;
    const bool all_gone = std::all_of(sources.begin(), sources.end(), [&](int p) {
      const Peer& peer = *peers_[p];
      return peer.said_goodbye && peer.receives_posted >= peer.goodbye;
    });
    if (all_gone) return all_sources_gone(sources);
  }
  return "";
}

void UcxTransport::endpoint_failed(void* arg, ucp_ep_h, ucs_status_t status) {
  Peer* peer = static_cast<Peer*>(arg);
  peer->owner->endpoint_lost(*peer, status);  // inside ucp_worker_progress: mutex_ is held
}

void UcxTransport::endpoint_lost(Peer& peer, ucs_status_t status) {
  // After its goodbye a peer may go at any time; while closing, this rank does not care.
  if (peer.said_goodbye || stopping_) return;
  fail_locked(peer_exited(peer_name(peer.rank)) + " (UCX: " + ucx_.describe(status) + ")", false);
}

bool UcxTransport::wait_until(const TransportRequest& posted, Deadline deadline, Clock::time_point until) {
  // Every request waited on here was made by send() or recv().
  Operation* request = static_cast<Operation*>(posted.get());
  std::unique_lock<std::mutex> lock(mutex_);
  if (!await(lock, completed_, *request, deadline, until, [&] { return request->done || failed_; })) return false;
  completed_.wait(lock, [&] { return !request->checking; });  // another waiter checks it
  if (request->ok && request->unchecked) {
    // Its tag, then the copy into the caller's buffer, on this thread: the progress thread goes on.
    request->unchecked = false;
    request->checking = true;
    lock.unlock();
    const bool good = authentic(*request);
    if (good) std::memcpy(request->data, request->sealed.data(), request->header.nbytes);
    std::vector<char>().swap(request->sealed);
    lock.lock();
    request->checking = false;
    completed_.notify_all();
    if (!good) {
      request->ok = false;
      fail_locked(integrity_failure(*request), false);
      wake();  // the progress thread tells the peers and quiesces
    }
  }
  // A request that completed stays good even if the transport failed afterwards.
  if (request->ok) return true;
  completed_.wait(lock, [&] { return quiesced_; });  // the caller may free buffers next
  TransportFailure{failure_, failure_timed_out_}.raise();
}

int UcxTransport::awaited_rank() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const InFlight& entry : in_flight_) {
    if (entry.op && !entry.sending) return entry.peer == kAnySource ? entry.op->sources.front() : entry.peer;
  }
  return kNobody;
}

bool UcxTransport::fail_locked(const std::string& reason, bool timed_out) {
  if (failed_) return false;
  failed_ = true;
  failure_timed_out_ = timed_out;
  failure_ = reason;
  completed_.notify_all();
  return true;
}

void UcxTransport::fail(const std::string& reason, bool timed_out) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!fail_locked(reason, timed_out)) return;
  }
  wake();  // the progress thread tells the peers and quiesces
}

void UcxTransport::abort(const std::string& reason, bool timed_out) { fail(reason, timed_out); }

void UcxTransport::quiesce() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    completed_.wait(lock, [&] { return quiesced_; });
  }
  control_->quiesce();
}

TransportFailure UcxTransport::failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failed_ ? TransportFailure{failure_, failure_timed_out_} : TransportFailure{};
}

void UcxTransport::progress_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  int idle_turns = 0;
  while (!stopping_) {
    if (failed_) {
      if (!failure_told_) {
        // Over the control links, so that each peer hears "rank R aborted: <reason>".
        failure_told_ = true;
        const std::string reason = failure_;
        const bool timed_out = failure_timed_out_;
        lock.unlock();
        failed_first(reason, timed_out);
        control_->abort(reason, timed_out);
        lock.lock();
      }
      if (!quiesced_) quiesce_locked(lock);
      lock.unlock();
      epoll_event events[2];
      poller_.wait(events, 2, -1);  // until the destructor wakes it
      lock.lock();
      continue;
    }
    bool moved = ucx_.worker_progress(worker_) != 0;
    moved = reap_locked() || moved;
    if (moved || ++idle_turns < kSpinTurns) {
      if (moved) idle_turns = 0;
      lock.unlock();
      if (!moved) std::this_thread::yield();  // a poster or a waiter may want the lock
      lock.lock();
      continue;
    }
    idle_turns = 0;
    if (ucx_.worker_arm(worker_) == UCS_ERR_BUSY) continue;  // events came meanwhile
    const bool busy = std::any_of(in_flight_.begin(), in_flight_.end(), [](const InFlight& e) { return e.op; });
    lock.unlock();
    epoll_event events[2];
    poller_.wait(events, 2, busy ? kBusySleepMillis : kIdleSleepMillis);
    lock.lock();
  }
}

void UcxTransport::quiesce_locked(std::unique_lock<std::mutex>& lock) {
  // Cancelled receives and the sends of force-closed endpoints complete with an error, after
  // which UCX touches no buffer of theirs.
  for (const InFlight& entry : in_flight_) {
    if (!entry.sending) ucx_.request_cancel(worker_, entry.request);
  }
  close_endpoints(lock, /*force=*/true, deadline_after(kQuiesceSeconds), [&] { return !in_flight_.empty(); });
  quiesced_ = true;
  completed_.notify_all();
}

template <typename Busy>
void UcxTransport::close_endpoints(std::unique_lock<std::mutex>& lock, bool force, Deadline give_up, Busy busy) {
  ucp_request_param_t param{};
  if (force) {
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  }
  std::vector<void*> closing;
  for (auto& peer : peers_) {
    if (!peer || !peer->ep) continue;
    void* request = ucx_.ep_close_nbx(peer->ep, &param);
    peer->ep = nullptr;
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) closing.push_back(request);
  }
  while ((busy() || !closing.empty()) && Clock::now() < give_up) {
    ucx_.worker_progress(worker_);
    reap_locked();
    closing.erase(std::remove_if(closing.begin(), closing.end(),
                                 [&](void* request) {
                                   if (ucx_.request_check_status(request) == UCS_INPROGRESS) return false;
                                   ucx_.request_free(request);
                                   return true;
                                 }),
                  closing.end());
    lock.unlock();  // a waiter may want to see the news
    std::this_thread::yield();
    lock.lock();
  }
}

void UcxTransport::say_goodbye() {
  // The progress thread has stopped; a collective returns only once its sends are done, so
  // the goodbye follows the last message to each peer. Then the endpoints flush: every
  // message reaches its peer before this rank's worker goes.
  std::unique_lock<std::mutex> lock(mutex_);
  if (failed_) return;  // the peers were told why instead
  for (auto& peer : peers_) {
    if (!peer) continue;
    peer->goodbye_to_send = peer->sent;
    ucp_request_param_t param{};
    void* request = ucx_.tag_send_nbx(peer->ep, &peer->goodbye_to_send, sizeof(uint64_t),
                                      ucx_tag(uint64_t(Part::kGoodbye), rank_, 0), &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) {
      in_flight_.push_back({nullptr, Part::kGoodbye, true, peer->rank, request});
    }
  }
  close_endpoints(lock, /*force=*/false, deadline_after(kGoodbyeSeconds), [&] {
    return std::any_of(in_flight_.begin(), in_flight_.end(), [](const InFlight& e) { return e.sending; });
  });
}

void UcxTransport::release_ucx() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (worker_ != nullptr) {
    for (const InFlight& entry : in_flight_) {
      if (!entry.sending) ucx_.request_cancel(worker_, entry.request);
    }
    ucx_.worker_progress(worker_);
    for (const InFlight& entry : in_flight_) ucx_.request_free(entry.request);  // released once done
    in_flight_.clear();
    close_endpoints(lock, /*force=*/true, deadline_after(kQuiesceSeconds), [] { return false; });
    ucx_.worker_destroy(worker_);
    worker_ = nullptr;
  }
  if (context_ != nullptr) {
    ucx_.cleanup(context_);
    context_ = nullptr;
  }
}

}  // namespace collectives
