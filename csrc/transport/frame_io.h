// The connection layer every event loop of the core shares (the ring's transport, the
// reducer, a worker's channels to the reducers): reading frames as bytes come, writing them as
// the socket takes them, each frame protected as its link says (transport/wire_security.h).
//
// On the wire a frame is its header, its payload (header.nbytes bytes) and, unless the link's
// security is kNone, a tag over both.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "transport/byte_stream.h"
#include "transport/frame.h"
#include "transport/wire_security.h"

namespace collectives {

// Said of a failure that a header caused on a protected link: the tag that proves the header
// comes after the payload, which a header that is wrong does not announce truthfully, so a
// peer that disagrees cannot be told from a header altered on the way.
constexpr char kUncheckedHeader[] = " (or the header was altered on the way: its tag is not yet checked)";

// A frame's size on the wire: header, payload and the link's tag.
inline uint64_t wire_bytes(const FrameHeader& header, const FrameProtection& protection) {
  return sizeof(FrameHeader) + header.nbytes + protection.tag_bytes();
}

// The reading end of one byte stream (a socket's, a UCX stream's): first a header, then its payload into memory the caller
// names once it has seen the header, then the tag; the bytes arrive in pieces of any size.
class FrameReader {
 public:
  enum class Event { kNone, kHeader, kFrame };
  explicit FrameReader(FrameProtection protection = {}) : protection_(std::move(protection)) {}

  const FrameHeader& header() const { return header_; }
  // Where the next bytes go.
  char* next();
  // How many bytes, at most `limit`, still belong to the current header, payload or tag.
  size_t wanted(uint64_t limit) const;
  // `n` bytes were read into next(): kHeader when that completed the header (then call
  // read_payload_into()), kFrame when it completed the frame (then check authentic()).
  Event advance(size_t n);
  // The payload goes to `into`; true if nothing more is to come (the frame is whole already).
  bool read_payload_into(char* into);
  // Once the frame is whole: whether its tag is right (with kAead, the payload is decrypted
  // in place). Call exactly once per frame: frames are counted.
  bool authentic() { return protection_.open(header_, payload_, header_.nbytes, tag_); }
  // Whether payloads reach memory before they are checked (they go to staging memory then).
  bool checks() const { return protection_.tag_bytes() > 0; }
  WireSecurity security() const { return protection_.mode(); }
  void next_frame() { read_ = 0; }

 private:
  uint64_t frame_bytes() const { return wire_bytes(header_, protection_); }

  FrameProtection protection_;
  FrameHeader header_;
  char* payload_ = nullptr;
  unsigned char tag_[kTagBytes];
  uint64_t read_ = 0;  // bytes of the current frame read so far
};

// The writing end of one byte stream: one frame at a time, written as the stream takes it. The
// frame is sealed when its first byte goes out, so a frame started but not yet written can be
// dropped (discard) without a gap in the frame count.
class FrameWriter {
 public:
  explicit FrameWriter(FrameProtection protection = {}) : protection_(std::move(protection)) {}

  // Starts the next frame (none is under way); `payload` stays valid until done().
  void start(const FrameHeader& header, const char* payload);
  // Writes what the socket takes now, at most about `budget` payload bytes: the bytes
  // written, 0 if the socket is full, -1 (errno set) if it failed.
  ssize_t write_some(ByteStream& stream, uint64_t budget = UINT64_MAX);
  ssize_t write_some(int fd, uint64_t budget = UINT64_MAX);
  bool busy() const { return busy_; }
  // Whether some of the frame under way may be on the wire (then it cannot be dropped).
  bool mid_frame() const { return busy_ && (sent_ > 0 || held_); }
  // Whether the frame under way has been written whole (and the writer is free again).
  bool done() const { return !busy_; }
  // Drops the frame under way, of which no byte may have been written; nothing if none is.
  void discard();

 private:
  uint64_t frame_bytes() const { return wire_bytes(header_, protection_); }

  FrameProtection protection_;
  FrameHeader header_;
  const char* payload_ = nullptr;
  std::vector<char> sealed_;  // kAead: the encrypted payload
  unsigned char tag_[kTagBytes];
  uint64_t sent_ = 0;
  bool sealed_frame_ = false;  // the tag (and kAead's payload) of the frame under way are made
  bool held_ = false;          // the stream holds bytes of it that it has not reported written
  bool busy_ = false;
};

// Writes the frame under way, if any, then this small one (goodbye, abort), waiting until
// `deadline` for room; false if the socket failed or stayed full. For the rare frames sent
// outside the data path.
bool write_frame(ByteStream& stream, FrameWriter& writer, const FrameHeader& header, const std::string& payload,
                 Deadline deadline);
bool write_frame(int fd, FrameWriter& writer, const FrameHeader& header, const std::string& payload,
                 Deadline deadline);
// Writes the rest of the frame under way, waiting until `deadline`; false as above.
bool finish_frame(ByteStream& stream, FrameWriter& writer, Deadline deadline);
// Reads one whole frame of at most `max_payload` bytes into `reader`'s header and `payload`,
// waiting until `deadline`: "" once it is in and authentic, else why not. For the rare frames
// read outside an event loop (a greeting).
std::string read_frame(ByteStream& stream, FrameReader& reader, std::string* payload, uint64_t max_payload,
                       Deadline deadline);

}  // namespace collectives
