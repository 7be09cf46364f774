// The routing transport: each peer is reached over one of two transports, shared memory for
// the ranks of this host and TCP for the others (as decided by the control plane's same-host
// probe, collectives/_shm.py). Algorithms see one Transport; the two parts fail as one: the
// first failure of either is the failure of both, with its reason, and every peer of both
// hears it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transport/shm/shm_transport.h"
#include "transport/tcp_transport.h"
#include "transport/transport.h"

namespace collectives {

class RoutingTransport : public Transport {
 public:
  // over_shm[p]: whether rank p is reached through `shm` (else through `tcp`). Both parts
  // have this rank's rank and size, and the same peer names.
  RoutingTransport(std::unique_ptr<Transport> tcp, std::unique_ptr<Transport> shm, std::vector<bool> over_shm);
  ~RoutingTransport() override;

  int rank() const override { return tcp_->rank(); }
  int size() const override { return tcp_->size(); }
  const std::string& peer_name(int peer) const override { return tcp_->peer_name(peer); }

  TransportRequest send(int peer, const FrameHeader& header, const void* data) override {
    return part(peer).send(peer, header, data);
  }
  TransportRequest recv(int peer, const FrameHeader& expected, void* data) override {
    return part(peer).recv(peer, expected, data);
  }
  bool receives_from_any_source() const override {
    return tcp_->receives_from_any_source() && shm_->receives_from_any_source();
  }
  // Each part looks at the links to the sources it reaches.
  void offer_waiting_frames(const std::shared_ptr<PostedOperation>& op) override {
    tcp_->offer_waiting_frames(op);
    shm_->offer_waiting_frames(op);
  }
  bool wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) override;
  // A receive from any source waits on both parts.
  void waiting_elsewhere(bool begins) override {
    tcp_->waiting_elsewhere(begins);
    shm_->waiting_elsewhere(begins);
  }
  int ask_waiting_on(int peer) override { return part(peer).ask_waiting_on(peer); }
  Transport* part_for(int peer) override { return &part(peer); }
  int awaited_rank() override;
  void abort(const std::string& reason, bool timed_out = false) override;
  void quiesce() override;
  TransportFailure failure() override;
  void notify(uint32_t about, const std::string& text) override;
  std::vector<PeerNotice> take_notices() override;

 private:
  Transport& part(int peer) { return over_shm_.at(peer) ? *shm_ : *tcp_; }

  std::unique_ptr<Transport> tcp_, shm_;
  const std::vector<bool> over_shm_;
};

// A rank's transport: TCP to every peer (tcp_links[p], connected and authenticated), and,
// where shm_links are given (ShmTransport's, with doorbell_fd), shared memory to the peers
// that have one: a RoutingTransport over both then. Owns every descriptor it is handed.
std::unique_ptr<Transport> make_transport(int rank, int size, std::vector<std::vector<Link>> tcp_links,
                                          std::vector<std::string> peer_names, int doorbell_fd = -1,
                                          std::vector<ShmLink> shm_links = {});

}  // namespace collectives
