#include "transport/router.h"

#include <unistd.h>

#include <stdexcept>
#include <utility>

namespace collectives {

RoutingTransport::RoutingTransport(std::unique_ptr<Transport> tcp, std::unique_ptr<Transport> shm,
                                   std::vector<bool> over_shm)
    : tcp_(std::move(tcp)), shm_(std::move(shm)), over_shm_(std::move(over_shm)) {
  if (static_cast<int>(over_shm_.size()) != tcp_->size() || shm_->size() != tcp_->size() ||
      shm_->rank() != tcp_->rank()) {
    throw std::invalid_argument("the parts of a routing transport must have the same ranks");
  }
  tcp_->become_part_of(this);
  shm_->become_part_of(this);
}

RoutingTransport::~RoutingTransport() {
  // The parts are destroyed after this body: a failure they meet while closing stays theirs.
  tcp_->become_part_of(nullptr);
  shm_->become_part_of(nullptr);
}

bool RoutingTransport::wait_until(const TransportRequest& request, Deadline deadline, Clock::time_point until) {
  if (request->from_any_source()) return wait_any_until(request, deadline, until);
  if (over_shm_.at(request->peer)) return shm_->wait_until(request, deadline, until);
  // A thread waiting on TCP does not drive the shared-memory rings: their progress thread must.
  const WaitingElsewhere meanwhile(*shm_);
  return tcp_->wait_until(request, deadline, until);
}

int RoutingTransport::awaited_rank() {
  const int over_shm = shm_->awaited_rank();
  return over_shm != kNobody ? over_shm : tcp_->awaited_rank();
}

void RoutingTransport::abort(const std::string& reason, bool timed_out) {
  // Idempotent in each part: the part that failed first calls this too, and keeps its reason.
  tcp_->abort(reason, timed_out);
  shm_->abort(reason, timed_out);
}

void RoutingTransport::quiesce() {
  tcp_->quiesce();
  shm_->quiesce();
}

TransportFailure RoutingTransport::failure() {
  // Both parts hold the same reason once both have failed; between the two, the one that has.
  TransportFailure failure = shm_->failure();
  return failure.empty() ? tcp_->failure() : failure;
}

void RoutingTransport::notify(uint32_t about, const std::string& text) {
  tcp_->notify(about, text);
  shm_->notify(about, text);
}

std::vector<PeerNotice> RoutingTransport::take_notices() {
  std::vector<PeerNotice> notices = tcp_->take_notices();
  for (PeerNotice& notice : shm_->take_notices()) notices.push_back(std::move(notice));
  return notices;
}

std::unique_ptr<Transport> make_transport(int rank, int size, std::vector<std::vector<Link>> tcp_links,
                                          std::vector<std::string> peer_names, int doorbell_fd,
                                          std::vector<ShmLink> shm_links) {
  if (shm_links.empty()) {
    if (doorbell_fd >= 0) ::close(doorbell_fd);
    return std::make_unique<TcpTransport>(rank, size, std::move(tcp_links), std::move(peer_names));
  }
  std::vector<bool> over_shm;
  for (const ShmLink& link : shm_links) over_shm.push_back(link.segment_fd >= 0);
  // Each part owns its descriptors from its first line, whatever it throws; the sockets are
  // not the shm part's, so they are closed here if it throws.
  std::unique_ptr<ShmTransport> shm;
  try {
    shm = std::make_unique<ShmTransport>(rank, size, doorbell_fd, std::move(shm_links), peer_names);
  } catch (...) {
    for (const auto& links : tcp_links) {
      for (const Link& link : links) ::close(link.fd);
    }
    throw;
  }
  auto tcp = std::make_unique<TcpTransport>(rank, size, std::move(tcp_links), std::move(peer_names));
  return std::make_unique<RoutingTransport>(std::move(tcp), std::move(shm), std::move(over_shm));
}

}  // namespace collectives
