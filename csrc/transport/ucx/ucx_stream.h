// Byte streams over UCX (ucp_stream_*): what the reducers and the workers' channels to them
// move their frames over under COLLECTIVES_TRANSPORT=ucx, in place of the sockets, with the
// same frames, checks and protection (frame_io.h over byte_stream.h).
//
// Each side's UCX worker address goes to the other over their authenticated TCP link (a
// kUcxAddress frame, protected as the link says), so a stream only ever joins two ends that
// authenticated each other. Endpoints use UCP_ERR_HANDLING_MODE_PEER: a peer's death ends its
// streams (read_some fails) rather than leaving them hung; that rules out UCX's shared-memory
// transports, so on one host the bytes go over UCX's TCP, unless RDMA devices are there.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "transport/byte_stream.h"
#include "transport/ucx/ucx_library.h"

namespace collectives {

class UcxStreamWorker : public StreamWorker {
 public:
  explicit UcxStreamWorker(const UcxLibrary& ucx);  // CollectiveError if UCX cannot start
  ~UcxStreamWorker() override;  // after every stream of it
  UcxStreamWorker(const UcxStreamWorker&) = delete;
  UcxStreamWorker& operator=(const UcxStreamWorker&) = delete;

  std::string address() const override { return address_; }
  std::unique_ptr<ByteStream> connect(const std::string& address, const std::string& peer_name) override;
  int fd() const override { return fd_; }
  bool progress() override;
  bool arm() override;

 private:
  const UcxLibrary& ucx_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int fd_ = -1;
  std::string address_;
};

class UcxStream : public ByteStream {
 public:
  UcxStream(const UcxLibrary& ucx, UcxStreamWorker& worker, ucp_worker_h handle);
  ~UcxStream() override;  // closes the endpoint at once: nothing in flight is touched afterwards
  UcxStream(const UcxStream&) = delete;
  UcxStream& operator=(const UcxStream&) = delete;

  ssize_t read_some(char* into, size_t n) override;
  ssize_t write_some(const iovec* iov, int parts) override;
  bool holding() const override { return sending_ != nullptr; }
  void wait(short events, int millis) override;
  void end_writes() override {}  // the peer learns it from the frames (a goodbye, an abort)
  int poll_fd() const override { return -1; }
  const char* kind() const override { return "ucx"; }

 private:
  // Frees a request that is no longer in progress (and forgets it); whether it went well.
  bool finish(void*& request, ucs_status_t status);
  friend class UcxStreamWorker;
  static void endpoint_failed(void* arg, ucp_ep_h ep, ucs_status_t status);

  const UcxLibrary& ucx_;
  UcxStreamWorker& worker_;
  ucp_worker_h handle_;
  ucp_ep_h ep_ = nullptr;
  ucs_status_t failure_ = UCS_OK;  // the endpoint's, once it failed
  void* receiving_ = nullptr;      // a receive under way (into the buffer read_some was given)
  void* sending_ = nullptr;        // a send under way, of sending_bytes_ bytes
  size_t sending_bytes_ = 0;
  std::array<ucp_dt_iov_t, 3> iov_{};  // what sending_ sends (UCX reads it until done)
};

}  // namespace collectives
