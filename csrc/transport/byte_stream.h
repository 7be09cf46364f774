// The byte streams under the connection layer (frame_io.h): a socket, or a UCX stream endpoint
// (transport/ucx/ucx_stream.h), so that the reducer and a worker's channels to the reducers speak
// one protocol, with one implementation, over either.
//
// A socket is polled through its descriptor. The streams of a StreamWorker (UCX's) have none of
// their own: the event loop polls the worker's descriptor, and on its events (or every few
// milliseconds: a transport may move bytes without signalling it) drives the worker and tries
// each of its streams.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <memory>
#include <string>

namespace collectives {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Reads at most `n` bytes into `into`: how many, 0 where the stream has ended, -1 with errno
  // (EAGAIN: none now; the same buffer is to be offered again) if it failed or has none yet.
  virtual ssize_t read_some(char* into, size_t n) = 0;
  // Writes what the stream takes now of `iov`: the bytes it is done with (the caller moves past
  // them), 0 if none yet, -1 (errno set) if it failed. A stream that holds bytes it was
  // offered (holding()) must be offered the same bytes again until it is done with them.
  virtual ssize_t write_some(const iovec* iov, int parts) = 0;
  // Whether bytes offered to write_some() are under way: then they are on the wire, in part.
  virtual bool holding() const { return false; }
  // Waits up to `millis` for the stream to take bytes (POLLOUT) or to have some (POLLIN).
  virtual void wait(short events, int millis) = 0;
  // This end writes nothing more; the peer sees the stream end where the stream can say so.
  virtual void end_writes() = 0;
  // The descriptor that an event loop polls for this stream; -1: it polls its worker's.
  virtual int poll_fd() const = 0;
  // "tcp", "ucx": what the bytes travel over.
  virtual const char* kind() const = 0;
};

// A non-blocking socket that someone else owns.
class SocketStream : public ByteStream {
 public:
  explicit SocketStream(int fd) : fd_(fd) {}
  ssize_t read_some(char* into, size_t n) override;
  ssize_t write_some(const iovec* iov, int parts) override;
  void wait(short events, int millis) override;
  void end_writes() override;
  int poll_fd() const override { return fd_; }
  const char* kind() const override { return "tcp"; }

 private:
  int fd_;
};

// Where streams over a data plane other than sockets come from: one per event loop, its
// streams driven together through one descriptor. Used by one thread at a time.
class StreamWorker {
 public:
  virtual ~StreamWorker() = default;
  // What a peer needs to reach this worker (connect()); sent to it over an authenticated link.
  virtual std::string address() const = 0;
  // A stream to the worker at `address`, of the peer called `peer_name`; CollectiveError if none.
  virtual std::unique_ptr<ByteStream> connect(const std::string& address, const std::string& peer_name) = 0;
  virtual int fd() const = 0;
  // Moves what can be moved now; true if anything happened.
  virtual bool progress() = 0;
  // Before sleeping on fd(): true if the worker will signal there, false if it has events
  // already (progress() again).
  virtual bool arm() = 0;
};

// A StreamWorker over UCX (libucp loaded from `library`, or the one loaded already where
// empty): CollectiveError saying what to do if this build has no UCX transport or it cannot start.
std::unique_ptr<StreamWorker> make_ucx_stream_worker(const std::string& library);

}  // namespace collectives
