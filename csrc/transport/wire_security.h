// What protects a connection's frames after the handshake (COLLECTIVES_WIRE_SECURITY).
//
// Each connection has two keys, one per direction, derived from the job's secret and both
// sides' fresh handshake challenges (derive_session_keys): a relay that passed the handshake
// through knows neither, and a frame cannot be moved from one connection to another. Every
// frame (header, payload) carries a 16-byte AES-256-GCM tag whose nonce is the frame's number
// on that connection and direction, so a frame that was altered, forged, replayed, reordered
// or dropped fails at the receiver before any byte of it is used.
//  - kMac: the header and the payload are authenticated (GMAC: GCM with all of it as
//    additional data), not encrypted.
//  - kAead: the header is authenticated and the payload encrypted (AES-256-GCM).
//  - kNone: neither (trusted fabrics); connections are still authenticated at the handshake.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "transport/frame.h"

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace collectives {

enum class WireSecurity : uint8_t { kNone = 0, kMac = 1, kAead = 2 };
const char* to_string(WireSecurity mode);

constexpr size_t kTagBytes = 16;
constexpr size_t kSessionKeyBytes = 32;

// A connected, authenticated socket, as the control plane hands it to the core: the file
// descriptor (the core owns it from then on) and the protection of each direction.
struct Link {
  int fd = -1;
  WireSecurity security = WireSecurity::kNone;
  std::string send_key;  // kSessionKeyBytes each, unless security is kNone
  std::string recv_key;
};

// Keys for both directions of one connection: HKDF-SHA256 (OpenSSL) of the job's secret, with
// `transcript` (the handshake's hellos, challenges included) as its context. Returns
// 2 * kSessionKeyBytes bytes: the client's sending key, then the server's.
std::string derive_session_keys(const std::string& secret, const std::string& transcript);

// One direction of one connection: seals the frames it sends, or opens those it receives,
// counting them.
class FrameProtection {
 public:
  FrameProtection() = default;  // kNone
  FrameProtection(WireSecurity mode, const std::string& key);
  FrameProtection(FrameProtection&& other) noexcept;
  FrameProtection& operator=(FrameProtection&& other) noexcept;
  FrameProtection(const FrameProtection&) = delete;
  FrameProtection& operator=(const FrameProtection&) = delete;
  ~FrameProtection();

  WireSecurity mode() const { return mode_; }
  size_t tag_bytes() const { return mode_ == WireSecurity::kNone ? 0 : kTagBytes; }
  bool encrypts() const { return mode_ == WireSecurity::kAead; }

  // The next frame's tag; with kAead the payload is encrypted from `payload` into `out`.
  void seal(const FrameHeader& header, const char* payload, char* out, uint64_t nbytes,
            unsigned char* tag);
  // Whether the next frame's tag is right; with kAead its payload is decrypted in place (and
  // must not be used when this returns false).
  bool open(const FrameHeader& header, char* payload, uint64_t nbytes, const unsigned char* tag) {
    return open_numbered(frames_++, header, payload, nbytes, tag);
  }
  // open() of frame `number`, for a receiver that numbers its frames itself (UCX: a lane's
  // headers arrive in order, their payloads complete in any order).
  bool open_numbered(uint64_t number, const FrameHeader& header, char* payload, uint64_t nbytes,
                     const unsigned char* tag);
  // The last sealed frame never reached the wire: its number goes to the next one.
  void unseal() { --frames_; }

 private:
  void start_frame(uint64_t number, const FrameHeader& header, bool sealing);

  WireSecurity mode_ = WireSecurity::kNone;
  EVP_CIPHER_CTX* ctx_ = nullptr;
  uint64_t frames_ = 0;  // the nonce of the next frame
};

// The endpoints of one link's two directions.
inline FrameProtection sending_protection(const Link& link) { return {link.security, link.send_key}; }
inline FrameProtection receiving_protection(const Link& link) { return {link.security, link.recv_key}; }

}  // namespace collectives
