#include "transport/frame_io.h"

#include <errno.h>
#include <poll.h>

#include <chrono>
#include <exception>

#include "transport/socket.h"

namespace collectives {
namespace {

constexpr uint64_t kHeaderBytes = sizeof(FrameHeader);

}  // namespace

/*
 * A frame's bytes, in order: [0, H) the header, [H, H + P) the payload, [H + P, H + P + T)
 * the tag, where H = sizeof(FrameHeader), P = header.nbytes and T = the tag's size (0 without
 * protection). read_ (sent_ for the writer) is the offset of the next byte in that order.
 */

char* FrameReader::next() {
  if (read_ < kHeaderBytes) return reinterpret_cast<char*>(&header_) + read_;
  if (read_ < kHeaderBytes + header_.nbytes) return payload_ + (read_ - kHeaderBytes);
  return reinterpret_cast<char*>(tag_) + (read_ - kHeaderBytes - header_.nbytes);
}

size_t FrameReader::wanted(uint64_t limit) const {
  const uint64_t end = read_ < kHeaderBytes                   ? kHeaderBytes
                       : read_ < kHeaderBytes + header_.nbytes ? kHeaderBytes + header_.nbytes
                                                               : frame_bytes();
  return static_cast<size_t>(std::min(limit, end - read_));
}

FrameReader::Event FrameReader::advance(size_t n) {
  const bool had_header = read_ >= kHeaderBytes;
  read_ += n;
  if (!had_header) return read_ == kHeaderBytes ? Event::kHeader : Event::kNone;
  return read_ == frame_bytes() ? Event::kFrame : Event::kNone;
}

bool FrameReader::read_payload_into(char* into) {
  payload_ = into;
  return frame_bytes() == kHeaderBytes;
}

void FrameWriter::start(const FrameHeader& header, const char* payload) {
  header_ = header;
  payload_ = payload;
  sent_ = 0;
  sealed_frame_ = false;
  busy_ = true;
}

void FrameWriter::discard() {
  // Its number goes to the next frame: nothing of this one ever reached the wire. A frame
  // written whole keeps its number (none is under way then).
  if (busy_ && sealed_frame_) protection_.unseal();
  busy_ = false;
}

ssize_t FrameWriter::write_some(int fd, uint64_t budget) {
  SocketStream stream(fd);
  return write_some(stream, budget);
}

ssize_t FrameWriter::write_some(ByteStream& stream, uint64_t budget) {
  if (!busy_) return 0;
  const uint64_t payload_bytes = header_.nbytes;
  if (!sealed_frame_) {
    try {
      if (protection_.encrypts()) sealed_.resize(payload_bytes);
      protection_.seal(header_, payload_, sealed_.data(), payload_bytes, tag_);
    } catch (const std::exception&) {
      // OpenSSL refused (or memory ran out): the connection cannot go on, as after a failed
      // write; the event loops report it as such, on their own thread.
      errno = EPROTO;
      return -1;
    }
    sealed_frame_ = true;
  }
  const char* payload = protection_.encrypts() ? sealed_.data() : payload_;
  iovec iov[3];
  int parts = 0;
  if (sent_ < kHeaderBytes) {
    iov[parts++] = {reinterpret_cast<char*>(&header_) + sent_, kHeaderBytes - sent_};
  }
  const uint64_t payload_from = std::max(sent_, kHeaderBytes) - kHeaderBytes;
  uint64_t payload_to = payload_from;  // the end of what this call offers of the payload
  if (payload_from < payload_bytes) {
    payload_to = payload_from + std::min(payload_bytes - payload_from, std::max<uint64_t>(budget, 1));
    iov[parts++] = {const_cast<char*>(payload) + payload_from, payload_to - payload_from};
  }
  // The tag follows once the payload is all offered (with a budget it may be later).
  if (payload_to == payload_bytes && protection_.tag_bytes() > 0) {
    const uint64_t tag_from = std::max(sent_, kHeaderBytes + payload_bytes) - kHeaderBytes - payload_bytes;
    iov[parts++] = {tag_ + tag_from, protection_.tag_bytes() - tag_from};
  }
  const ssize_t n = stream.write_some(iov, parts);
  held_ = stream.holding();
  if (n <= 0) return n;
  sent_ += n;
  if (sent_ == frame_bytes()) busy_ = false;
  return n;
}

bool finish_frame(ByteStream& stream, FrameWriter& writer, Deadline deadline) {
  while (writer.busy()) {
    const ssize_t n = writer.write_some(stream);
    if (n < 0) return false;
    if (n > 0) continue;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    stream.wait(POLLOUT, static_cast<int>(left.count()));
  }
  return true;
}

bool write_frame(ByteStream& stream, FrameWriter& writer, const FrameHeader& header, const std::string& payload,
                 Deadline deadline) {
  if (!finish_frame(stream, writer, deadline)) return false;
  writer.start(header, payload.data());
  return finish_frame(stream, writer, deadline);
}

bool write_frame(int fd, FrameWriter& writer, const FrameHeader& header, const std::string& payload,
                 Deadline deadline) {
  SocketStream stream(fd);
  return write_frame(stream, writer, header, payload, deadline);
}

std::string read_frame(ByteStream& stream, FrameReader& reader, std::string* payload, uint64_t max_payload,
                       Deadline deadline) {
  for (;;) {
    const ssize_t n = stream.read_some(reader.next(), reader.wanted(UINT64_MAX));
    if (n == 0) return "closed the connection";
    if (n < 0) {
      if (!would_block(errno)) return "lost the connection (" + errno_text(errno) + ")";
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return "sent nothing in time";
      stream.wait(POLLIN, static_cast<int>(left.count()));
      continue;
    }
    switch (reader.advance(n)) {
      case FrameReader::Event::kNone: continue;
      case FrameReader::Event::kHeader:
        if (reader.header().magic != kFrameMagic || reader.header().version != kProtocolVersion ||
            reader.header().nbytes > max_payload) {
          return "sent a frame that is not collectives protocol " + std::to_string(kProtocolVersion) +
                 (reader.checks() ? kUncheckedHeader : "");
        }
        payload->assign(reader.header().nbytes, '\0');
        if (!reader.read_payload_into(payload->data())) continue;
        break;
      case FrameReader::Event::kFrame: break;
    }
    const bool authentic = reader.authentic();
    reader.next_frame();
    return authentic ? "" : "sent a frame that failed its integrity check (COLLECTIVES_WIRE_SECURITY=" +
                                std::string(to_string(reader.security())) + ")";
  }
}

}  // namespace collectives
