#include "transport/ucx/ucx_stream.h"

#include <errno.h>
#include <poll.h>

#include <algorithm>

#include "common/error.h"

namespace collectives {
namespace {

// How long a wait trusts the worker's descriptor alone (a transport may move bytes without
// signalling it), and how long closing an endpoint may take.
constexpr int kSleepMillis = 2;
constexpr double kCloseSeconds = 2.0;

// What read_some and write_some return once the stream has failed: as a socket reset.
ssize_t connection_reset() {
  errno = ECONNRESET;
  return -1;
}

}  // namespace

UcxStreamWorker::UcxStreamWorker(const UcxLibrary& ucx) : ucx_(ucx) {
  try {
    start_ucx_worker(ucx_, UCP_FEATURE_STREAM, {}, &context_, &worker_, &fd_);
    ucp_address_t* address = nullptr;
    size_t address_bytes = 0;
    const ucs_status_t status = ucx_.worker_get_address(worker_, &address, &address_bytes);
    if (status != UCS_OK) throw CollectiveError("UCX gave no worker address: " + ucx_.describe(status));
    address_.assign(reinterpret_cast<const char*>(address), address_bytes);
    ucx_.worker_release_address(worker_, address);
  } catch (...) {
    if (worker_ != nullptr) ucx_.worker_destroy(worker_);
    if (context_ != nullptr) ucx_.cleanup(context_);
    throw;
  }
}

UcxStreamWorker::~UcxStreamWorker() {
  ucx_.worker_destroy(worker_);
  ucx_.cleanup(context_);
}

std::unique_ptr<ByteStream> UcxStreamWorker::connect(const std::string& address, const std::string& peer_name) {
  auto stream = std::make_unique<UcxStream>(ucx_, *this, worker_);
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &UcxStream::endpoint_failed;
  params.err_handler.arg = stream.get();
  const ucs_status_t status = ucx_.ep_create(worker_, &params, &stream->ep_);
  if (status != UCS_OK) {
    throw CollectiveError("UCX could not reach " + peer_name + ": " + ucx_.describe(status) +
                          " (a stream to a reducer needs a UCX transport that reports a peer's death: tcp or an "
                          "RDMA one, not shared memory alone; see UCX_TLS)");
  }
  return stream;
}

bool UcxStreamWorker::progress() {
  bool moved = false;
  while (ucx_.worker_progress(worker_) != 0) moved = true;
  return moved;
}

bool UcxStreamWorker::arm() { return ucx_.worker_arm(worker_) != UCS_ERR_BUSY; }

UcxStream::UcxStream(const UcxLibrary& ucx, UcxStreamWorker& worker, ucp_worker_h handle)
    : ucx_(ucx), worker_(worker), handle_(handle) {}

void UcxStream::endpoint_failed(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<UcxStream*>(arg)->failure_ = status;  // inside ucp_worker_progress, on the owner's thread
}

UcxStream::~UcxStream() {
  if (ep_ != nullptr) {
    if (receiving_ != nullptr) ucx_.request_cancel(handle_, receiving_);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* closing = ucx_.ep_close_nbx(ep_, &param);
    const Deadline give_up = deadline_after(kCloseSeconds);
    if (closing != nullptr && !UCS_PTR_IS_ERR(closing)) {
      while (ucx_.request_check_status(closing) == UCS_INPROGRESS && Clock::now() < give_up) {
        ucx_.worker_progress(handle_);
      }
      ucx_.request_free(closing);
    }
  }
  // Released once done, if they are not yet: the endpoint is gone, so no byte moves for them.
  if (receiving_ != nullptr) ucx_.request_free(receiving_);
  if (sending_ != nullptr) ucx_.request_free(sending_);
}

ssize_t UcxStream::read_some(char* into, size_t n) {
  /*
   * A receive that finds no data stays posted, into `into`, until bytes come: the caller
   * offers the same buffer again (FrameReader's next() moves only as bytes arrive). Bytes that
   * arrived before the endpoint failed are still read first; only then does the stream end.
   */
  if (receiving_ == nullptr) {
    ucp_request_param_t param{};
    size_t length = 0;
    void* request = ucx_.stream_recv_nbx(ep_, into, n, &length, &param);
    if (request == nullptr) return static_cast<ssize_t>(length);
    if (UCS_PTR_IS_ERR(request)) return connection_reset();
    receiving_ = request;
  }
  size_t length = 0;
  const ucs_status_t status = ucx_.stream_recv_request_test(receiving_, &length);
  if (status == UCS_INPROGRESS) {
    errno = failure_ == UCS_OK ? EAGAIN : ECONNRESET;
    return -1;
  }
  if (!finish(receiving_, status)) return connection_reset();
  return static_cast<ssize_t>(length);
}

ssize_t UcxStream::write_some(const iovec* iov, int parts) {
  // UCX takes the whole of what it is offered at once and reads it until the send is done:
  // the bytes count as written only then.
  if (sending_ == nullptr) {
    if (failure_ != UCS_OK) return connection_reset();
    sending_bytes_ = 0;
    for (int i = 0; i < parts; ++i) {
      iov_[i] = {iov[i].iov_base, iov[i].iov_len};
      sending_bytes_ += iov[i].iov_len;
    }
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
    param.datatype = ucp_dt_make_iov();
    void* request = ucx_.stream_send_nbx(ep_, iov_.data(), parts, &param);
    if (request == nullptr) return static_cast<ssize_t>(sending_bytes_);
    if (UCS_PTR_IS_ERR(request)) return connection_reset();
    sending_ = request;
  }
  const ucs_status_t status = ucx_.request_check_status(sending_);
  if (status == UCS_INPROGRESS) return 0;
  if (!finish(sending_, status)) return connection_reset();
  return static_cast<ssize_t>(sending_bytes_);
}

bool UcxStream::finish(void*& request, ucs_status_t status) {
  ucx_.request_free(request);
  request = nullptr;
  return status == UCS_OK;
}

void UcxStream::wait(short, int millis) {
  if (worker_.progress() || !worker_.arm()) return;
  pollfd pfd{worker_.fd(), POLLIN, 0};
  poll(&pfd, 1, std::min(millis, kSleepMillis));
}

}  // namespace collectives
