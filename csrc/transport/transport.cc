#include "transport/transport.h"

#include <algorithm>

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

std::string Transport::why_timed_out(const TransportOperation& request) {
  const FrameHeader& h = request.header;
  if (!request.is_send) return why_receive_timed_out(request.peer, h);
  return "timed out sending message " + std::to_string(h.unit) + " (" + std::to_string(h.nbytes) + " bytes) to " +
         peer_name(request.peer);
}

}  // namespace collectives
