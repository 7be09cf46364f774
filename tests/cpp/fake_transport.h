// An in-memory Transport for the C++ tests: ranks are threads of one process, and a message is
// copied into its receiver's queue under one lock. It keeps the Transport contract (in-order
// matching per peer, headers checked before a byte reaches a buffer, one sticky failure that
// every peer hears, the answers to "what do you wait for") and adds what a real network cannot give a test: a
// fault at a chosen message of a chosen rank, the same on every run. The real transports are
// tested too; this one does not stand in for them.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace collectives {
namespace testing {

class FakeNetwork : public std::enable_shared_from_this<FakeNetwork> {
 public:
  enum class Fault {
    kAbort,   // the rank fails there, as if its wait had thrown, and tells its peers why
    kSilent,  // from there on, nothing the rank sends arrives, as a hung process or a cut link
  };

  explicit FakeNetwork(int size) : ranks_(size) {
    for (auto& state : ranks_) state.from.resize(size);
  }

  // Rank `rank` meets `fault` at its message number `message` (0: its first send).
  void inject(int rank, uint64_t message, Fault fault) {
    std::lock_guard<std::mutex> lock(mutex_);
    ranks_[rank].fault_at = message;
    ranks_[rank].fault = fault;
  }

  // Messages rank `rank` has sent so far (what inject() counts).
  uint64_t sent(int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    return ranks_[rank].sent;
  }

  // One transport per rank; the network lives as long as any of them.
  std::vector<std::unique_ptr<Transport>> transports() {
    std::vector<std::unique_ptr<Transport>> result;
    for (int r = 0; r < static_cast<int>(ranks_.size()); ++r) {
      result.push_back(std::make_unique<Endpoint>(shared_from_this(), r));
    }
    return result;
  }

 private:
  struct Operation : TransportOperation {
    void* data = nullptr;
    bool done = false;
    bool ok = false;
  };
  using OperationPtr = std::shared_ptr<Operation>;

  struct Message {
    FrameHeader header;
    std::vector<char> payload;
  };

  // What one rank has received from one peer: messages not yet matched, receives not yet
  // filled (for each communicator, at most one of the two holds any of its own).
  struct Inbox {
    std::deque<Message> messages;
    std::deque<OperationPtr> receives;
  };

  struct RankState {
    std::vector<Inbox> from;  // [peer]
    std::vector<PeerNotice> notices;
    uint64_t sent = 0;
    uint64_t fault_at = UINT64_MAX;
    Fault fault = Fault::kAbort;
    bool silent = false;
    bool closed = false;
    bool failed = false;
    bool timed_out = false;
    std::string failure;
  };

  static std::string name(int rank) { return "rank " + std::to_string(rank); }

  static std::string describe_message(const FrameHeader& h) {
    return "message " + std::to_string(h.unit) + " (" + std::to_string(h.nbytes) + " bytes)";
  }

  // The first failure of `rank` sticks; its pending receives end, and (unless it is silent)
  // every peer hears "rank R aborted: <reason>", as from the TCP transport's abort frame.
  void fail_locked(int rank, const std::string& reason, bool timed_out, bool tell_peers = true) {
    RankState& state = ranks_[rank];
    if (state.failed) return;
    state.failed = true;
    state.timed_out = timed_out;
    state.failure = reason;
    for (Inbox& inbox : state.from) {
      for (auto& op : inbox.receives) op->done = true;
      inbox.receives.clear();
    }
    changed_.notify_all();
    if (!tell_peers || state.silent) return;
    for (int peer = 0; peer < static_cast<int>(ranks_.size()); ++peer) {
      if (peer != rank && !ranks_[peer].closed) {
        fail_locked(peer, name(rank) + " aborted: " + reason, timed_out, false);
      }
    }
  }

  // Matches what `to` has from `from` with its receives, in order; notices are taken as they
  // come up, as the TCP transport reads them between data frames.
  void deliver_locked(int to, int from) {
    RankState& state = ranks_[to];
    Inbox& inbox = state.from[from];
    // Each message goes to the oldest receive of its communicator; one with none waits, and
    // the messages of other communicators behind it go on (the TCP transport reads them ahead).
    for (auto message = inbox.messages.begin(); !state.failed && message != inbox.messages.end();) {
      if (message->header.kind == static_cast<uint8_t>(FrameKind::kNotice)) {
        state.notices.push_back({from, message->header.unit,
                                 std::string(message->payload.begin(), message->payload.end())});
        message = inbox.messages.erase(message);
        continue;
      }
      const uint64_t comm = message->header.comm;
      auto op = std::find_if(inbox.receives.begin(), inbox.receives.end(),
                             [&](const OperationPtr& r) { return r->header.comm == comm; });
      const bool first_of_its_comm = std::none_of(inbox.messages.begin(), message,
                                                  [&](const Message& m) { return m.header.comm == comm; });
      if (op == inbox.receives.end() || !first_of_its_comm) {
        ++message;
        continue;
      }
      std::string why = mismatch((*op)->header, message->header);
      if (!why.empty()) return fail_locked(to, name(from) + " sent " + why, false);
      if (!message->payload.empty()) std::memcpy((*op)->data, message->payload.data(), message->payload.size());
      (*op)->done = (*op)->ok = true;
      inbox.receives.erase(op);
      changed_.notify_all();
      message = inbox.messages.erase(message);
    }
  }

  // What `rank` answers when asked what it waits for (the TCP transport's kWaitingOn): the
  // first peer it waits to receive from. A silent rank answers nothing.
  int waiting_on_locked(int rank) {
    const RankState& state = ranks_[rank];
    if (state.silent) return Transport::kNoAnswer;
    for (int peer = 0; peer < static_cast<int>(ranks_.size()); ++peer) {
      if (!state.from[peer].receives.empty()) return peer;
    }
    return Transport::kNobody;
  }

  class Endpoint : public Transport {
   public:
    Endpoint(std::shared_ptr<FakeNetwork> network, int rank) : net_(std::move(network)), rank_(rank) {
      for (int r = 0; r < size(); ++r) names_.push_back(name(r));
    }

    ~Endpoint() override {
      std::lock_guard<std::mutex> lock(net_->mutex_);
      net_->ranks_[rank_].closed = true;
      for (int peer = 0; peer < size(); ++peer) {
        if (peer != rank_ && !net_->ranks_[peer].from[rank_].receives.empty()) {
          net_->fail_locked(peer, peer_closed_mid_exchange(name(rank_)), false);
        }
      }
    }

    int rank() const override { return rank_; }
    int size() const override { return static_cast<int>(net_->ranks_.size()); }
    const std::string& peer_name(int peer) const override { return names_[peer]; }

    TransportRequest send(int peer, const FrameHeader& header, const void* data) override {
      auto op = make(peer, header, const_cast<void*>(data), true);
      std::lock_guard<std::mutex> lock(net_->mutex_);
      RankState& me = net_->ranks_[rank_];
      op->done = true;
      if (me.failed) return op;
      if (net_->ranks_[peer].closed) {
        net_->fail_locked(rank_, peer_has_closed(name(peer)), false);
        return op;
      }
      if (me.sent++ == me.fault_at) {
        if (me.fault == Fault::kAbort) {
          net_->fail_locked(rank_, "injected failure at message " + std::to_string(me.fault_at), false);
          return op;
        }
        me.silent = true;
      }
      op->ok = true;
      if (!me.silent) post_message(peer, header, data);
      return op;
    }

    TransportRequest recv(int peer, const FrameHeader& expected, void* data) override {
      auto op = make(peer, expected, data, false);
      matching().number(peer, op->header);  // matched in posting order: numbered at posting
      std::lock_guard<std::mutex> lock(net_->mutex_);
      RankState& me = net_->ranks_[rank_];
      if (me.failed) {
        op->done = true;
        return op;
      }
      Inbox& inbox = me.from[peer];
      if (net_->ranks_[peer].closed && inbox.messages.empty()) {
        op->done = true;
        net_->fail_locked(rank_, peer_has_closed(name(peer)), false);
        return op;
      }
      inbox.receives.push_back(op);
      net_->deliver_locked(rank_, peer);
      return op;
    }

    bool wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) override {
      auto* op = static_cast<Operation*>(request.get());
      std::unique_lock<std::mutex> lock(net_->mutex_);
      RankState& me = net_->ranks_[rank_];
      while (!op->done && !me.failed) {
        if (net_->changed_.wait_until(lock, std::min(deadline, until)) != std::cv_status::timeout) continue;
        if (op->done || me.failed) break;
        if (Clock::now() < deadline) return false;
        std::string reason = "timed out waiting for " + name(op->peer) + " to send " + describe_message(op->header);
        if (!op->is_send && !me.silent) {  // a hung rank asks nobody anything
          lock.unlock();
          reason = why_receive_timed_out(op->peer, op->header);
          lock.lock();
          if (op->done || me.failed) break;
        }
        net_->fail_locked(rank_, reason, true);
      }
      if (op->ok) return true;
      TransportFailure{me.failure, me.timed_out}.raise();
    }

    // The answer is there at once: no grace to wait, so fault tests stay fast.
    int ask_waiting_on(int peer) override {
      std::lock_guard<std::mutex> lock(net_->mutex_);
      return net_->ranks_[rank_].failed ? kFailedMeanwhile : net_->waiting_on_locked(peer);
    }

    int awaited_rank() override {
      std::lock_guard<std::mutex> lock(net_->mutex_);
      return net_->waiting_on_locked(rank_);
    }

    void abort(const std::string& reason, bool timed_out) override {
      std::lock_guard<std::mutex> lock(net_->mutex_);
      net_->fail_locked(rank_, reason, timed_out);
    }

    // Payloads are copied under the network's lock, never after a failure: nothing to wait for.
    void quiesce() override {}

    TransportFailure failure() override {
      std::lock_guard<std::mutex> lock(net_->mutex_);
      const RankState& me = net_->ranks_[rank_];
      return me.failed ? TransportFailure{me.failure, me.timed_out} : TransportFailure{};
    }

    void notify(uint32_t about, const std::string& text) override {
      FrameHeader header;
      header.kind = static_cast<uint8_t>(FrameKind::kNotice);
      header.unit = about;
      header.nbytes = text.size();
      std::lock_guard<std::mutex> lock(net_->mutex_);
      if (net_->ranks_[rank_].silent) return;
      for (int peer = 0; peer < size(); ++peer) {
        if (peer != rank_) post_message(peer, header, text.data());
      }
    }

    std::vector<PeerNotice> take_notices() override {
      std::lock_guard<std::mutex> lock(net_->mutex_);
      return std::exchange(net_->ranks_[rank_].notices, {});
    }

   private:
    OperationPtr make(int peer, const FrameHeader& header, void* data, bool is_send) {
      auto op = std::make_shared<Operation>();
      op->peer = peer;
      op->is_send = is_send;
      op->header = header;
      op->data = data;
      return op;
    }

    // With the network's lock held.
    void post_message(int peer, const FrameHeader& header, const void* data) {
      RankState& to = net_->ranks_[peer];
      if (to.failed || to.closed) return;
      const char* bytes = static_cast<const char*>(data);
      to.from[rank_].messages.push_back({header, std::vector<char>(bytes, bytes + header.nbytes)});
      net_->deliver_locked(peer, rank_);
    }

    std::shared_ptr<FakeNetwork> net_;
    const int rank_;
    std::vector<std::string> names_;
  };

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<RankState> ranks_;
};

}  // namespace testing
}  // namespace collectives
