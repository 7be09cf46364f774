#include "transport/transport.h"

#include <algorithm>
#include <stdexcept>

namespace collectives {
namespace {

std::string what_it_did(StalledPeer::Why why) {
  switch (why) {
    case StalledPeer::Why::kSilent: return "did not answer (stopped, or cut off)";
    case StalledPeer::Why::kWaitsForNobody:
      return "waits to receive from no rank (it stopped calling collectives, or is busy elsewhere)";
    case StalledPeer::Why::kWaitsOnAsker: return "waits on this rank in turn (the ranks disagree on the order of messages)";
    case StalledPeer::Why::kWaitsInCircle: return "waits in a circle of ranks (the ranks disagree on the order of messages)";
  }
  return "";
}

}  // namespace

std::shared_ptr<PostedOperation> PostedOperation::notice(int peer, uint32_t about, const std::string& text) {
  auto op = std::make_shared<PostedOperation>();
  op->peer = peer;
  op->is_send = true;
  op->header.kind = static_cast<uint8_t>(FrameKind::kNotice);
  op->header.unit = about;
  op->owned = text.substr(0, kMaxAbortReason);
  op->header.nbytes = op->owned.size();
  op->data = op->owned.data();
  return op;
}

std::string peer_exited(const std::string& peer) {
  return peer + " closed the connection (process exited or was killed?)";
}

std::string peer_has_closed(const std::string& peer) { return peer + " has closed its communicator"; }

std::string peer_closed_mid_exchange(const std::string& peer) {
  return peer + " closed its communicator while this rank still exchanges data with it";
}

std::vector<StalledPeer> Transport::trace_stall(const std::vector<int>& peers) {
  Transport* whole = whole_.load();
  Transport& asker = whole ? *whole : *this;  // a chain may lead to a peer another part reaches
  std::vector<StalledPeer> ends;
  for (int first : peers) {
    std::vector<int> chain{first};
    for (;;) {
      const int next = asker.ask_waiting_on(chain.back());
      if (next == kFailedMeanwhile) return {};
      const bool circle = std::find(chain.begin(), chain.end(), next) != chain.end();
      if (next >= 0 && next != rank() && !circle) {
        chain.push_back(next);
        continue;
      }
      using Why = StalledPeer::Why;
      const Why why = next == kNoAnswer ? Why::kSilent : next == kNobody ? Why::kWaitsForNobody
                      : next == rank()  ? Why::kWaitsOnAsker : Why::kWaitsInCircle;
      const bool known = std::any_of(ends.begin(), ends.end(), [&](const StalledPeer& e) { return e.rank == chain.back(); });
      if (!known) ends.push_back({chain.back(), why, static_cast<int>(chain.size()) - 1});
      break;
    }
  }
  return ends;
}

std::string Transport::describe(const StalledPeer& stalled) const {
  std::string text = peer_name(stalled.rank) + " " + what_it_did(stalled.why);
  if (stalled.through > 0) {
    text += ", and this rank waits on it through " + std::to_string(stalled.through) + " other rank" +
            (stalled.through == 1 ? "" : "s") + " that wait in turn";
  }
  return text;
}

std::string Transport::why_receive_timed_out(int peer, const FrameHeader& expected) {
  const std::vector<StalledPeer> found = trace_stall({peer});
  if (found.empty()) return "";
  const std::string message = "message " + std::to_string(expected.unit) + " (" + std::to_string(expected.nbytes) + " bytes)";
  if (found.front().through == 0) {
    return "timed out waiting for " + peer_name(peer) + " to send " + message + ": it " + what_it_did(found.front().why);
  }
  return "timed out waiting for " + message + ": " + describe(found.front());
}

std::string Transport::why_any_receive_timed_out(const std::vector<int>& sources, const FrameHeader& expected) {
  const std::vector<StalledPeer> found = trace_stall(sources);
  if (found.empty()) return "";
  std::string text = "timed out waiting for message " + std::to_string(expected.unit) + " (" +
                     std::to_string(expected.nbytes) + " bytes) from any of " + std::to_string(sources.size()) + " ranks";
  for (const StalledPeer& stalled : found) text += "; " + describe(stalled);
  return text;
}

std::string Transport::why_timed_out(const TransportOperation& request) {
  const FrameHeader& h = request.header;
  if (request.from_any_source()) return why_any_receive_timed_out(request.sources, h);
  if (!request.is_send) return why_receive_timed_out(request.peer, h);
  return "timed out sending message " + std::to_string(h.unit) + " (" + std::to_string(h.nbytes) + " bytes) to " +
         peer_name(request.peer);
}

std::string Transport::all_sources_gone(const std::vector<int>& sources) const {
  std::string who;
  for (int p : sources) who += (who.empty() ? "" : ", ") + peer_name(p);
  return "every rank this rank receives from (" + who + ") has closed its communicator";
}

void Transport::source_gone(int peer) {
  Transport* whole = whole_.load();
  if (whole && whole->part_for(peer) != this) return;
  const std::vector<int> sources = matching().gone(peer);
  if (!sources.empty()) abort(all_sources_gone(sources));
}

TransportRequest Transport::recv_any(std::vector<int> sources, const FrameHeader& expected, void* data) {
  if (!receives_from_any_source()) {
    throw std::invalid_argument("this transport cannot receive from any source: name the sender");
  }
  for (int p : sources) {
    if (p < 0 || p >= size() || p == rank() || std::count(sources.begin(), sources.end(), p) != 1) {
      throw std::invalid_argument("recv_any: the ranks must be other ranks, each once");
    }
  }
  if (sources.empty()) throw std::invalid_argument("recv_any needs a rank to receive from");
  return post_recv_any(std::move(sources), expected, data);
}

TransportRequest Transport::post_recv_any(std::vector<int> sources, const FrameHeader& expected, void* data) {
  auto op = std::make_shared<PostedOperation>();
  op->peer = kAnySource;
  op->sources = std::move(sources);
  op->header = expected;
  op->data = static_cast<char*>(data);
  bool all_gone = false;
  if (matching().post(op, &all_gone)) {
    offer_waiting_frames(op);
  } else if (all_gone) {
    abort(all_sources_gone(op->sources));
  }
  return op;
}

bool Transport::wait_any_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) {
  const PostedOperation& op = static_cast<const PostedOperation&>(*request);
  ReceiveMatching& matching = this->matching();
  const WaitingElsewhere meanwhile(*this);
  std::unique_lock<std::mutex> lock(matching.mutex_);
  if (!await(lock, matching.changed_, op, deadline, until, [&] { return op.done || matching.failed_; })) return false;
  if (op.ok) return true;
  lock.unlock();
  quiesce();  // the caller may free the buffer next
  TransportFailure why = failure();
  if (why.empty()) why.reason = "the receive from any source ended without a message";
  why.raise();
}

}  // namespace collectives
