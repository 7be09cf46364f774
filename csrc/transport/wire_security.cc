#include "transport/wire_security.h"

#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace collectives {
namespace {

constexpr size_t kNonceBytes = 12;
// EVP's update calls take int lengths: larger payloads go in pieces.
constexpr uint64_t kMaxPiece = 1u << 30;
constexpr char kKeyLabel[] = "collectives session keys v1";

[[noreturn]] void crypto_failed(const char* what) {
  throw std::runtime_error(std::string("OpenSSL failed: ") + what);
}

}  // namespace

const char* to_string(WireSecurity mode) {
  switch (mode) {
    case WireSecurity::kNone: return "none";
    case WireSecurity::kMac: return "mac";
    case WireSecurity::kAead: return "aead";
  }
  return "unknown";
}

std::string derive_session_keys(const std::string& secret, const std::string& transcript) {
  std::string keys(2 * kSessionKeyBytes, '\0');
  size_t length = keys.size();
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
  const bool ok =
      ctx != nullptr && EVP_PKEY_derive_init(ctx) > 0 && EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
      EVP_PKEY_CTX_set1_hkdf_key(ctx, reinterpret_cast<const unsigned char*>(secret.data()),
                                 static_cast<int>(secret.size())) > 0 &&
      EVP_PKEY_CTX_set1_hkdf_salt(ctx, reinterpret_cast<const unsigned char*>(kKeyLabel),
                                  sizeof(kKeyLabel) - 1) > 0 &&
      EVP_PKEY_CTX_add1_hkdf_info(ctx, reinterpret_cast<const unsigned char*>(transcript.data()),
                                  static_cast<int>(transcript.size())) > 0 &&
      EVP_PKEY_derive(ctx, reinterpret_cast<unsigned char*>(keys.data()), &length) > 0 &&
      length == keys.size();
  EVP_PKEY_CTX_free(ctx);
  if (!ok) crypto_failed("HKDF-SHA256");
  return keys;
}

FrameProtection::FrameProtection(WireSecurity mode, const std::string& key) : mode_(mode) {
  if (mode_ == WireSecurity::kNone) return;
  if (key.size() != kSessionKeyBytes) {
    throw std::invalid_argument("a session key has " + std::to_string(kSessionKeyBytes) + " bytes, not " +
                                std::to_string(key.size()));
  }
  ctx_ = EVP_CIPHER_CTX_new();
  if (ctx_ == nullptr ||
      EVP_CipherInit_ex(ctx_, EVP_aes_256_gcm(), nullptr, reinterpret_cast<const unsigned char*>(key.data()),
                        nullptr, /*enc=*/-1) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_IVLEN, kNonceBytes, nullptr) != 1) {
    EVP_CIPHER_CTX_free(ctx_);
    crypto_failed("AES-256-GCM set-up");
  }
}

FrameProtection::FrameProtection(FrameProtection&& other) noexcept
    : mode_(other.mode_), ctx_(std::exchange(other.ctx_, nullptr)), frames_(other.frames_) {}

FrameProtection& FrameProtection::operator=(FrameProtection&& other) noexcept {
  if (this != &other) {
    EVP_CIPHER_CTX_free(ctx_);
    mode_ = other.mode_;
    ctx_ = std::exchange(other.ctx_, nullptr);
    frames_ = other.frames_;
  }
  return *this;
}

FrameProtection::~FrameProtection() { EVP_CIPHER_CTX_free(ctx_); }

void FrameProtection::start_frame(uint64_t frame, const FrameHeader& header, bool sealing) {
  // The nonce is the frame's number: never reused under one key, and a frame taken out of
  // order (replayed, reordered, dropped before it) is opened with the wrong one.
  unsigned char nonce[kNonceBytes] = {};
  std::memcpy(nonce + kNonceBytes - sizeof(frame), &frame, sizeof(frame));
  int unused;
  if (EVP_CipherInit_ex(ctx_, nullptr, nullptr, nullptr, nonce, sealing ? 1 : 0) != 1 ||
      EVP_CipherUpdate(ctx_, nullptr, &unused, reinterpret_cast<const unsigned char*>(&header),
                       sizeof(header)) != 1) {
    crypto_failed("AES-256-GCM frame start");
  }
}

void FrameProtection::seal(const FrameHeader& header, const char* payload, char* out, uint64_t nbytes,
                           unsigned char* tag) {
  if (mode_ == WireSecurity::kNone) return;
  start_frame(frames_++, header, /*sealing=*/true);
  int written;
  for (uint64_t done = 0; done < nbytes; done += kMaxPiece) {
    const int piece = static_cast<int>(std::min(kMaxPiece, nbytes - done));
    const auto* in = reinterpret_cast<const unsigned char*>(payload + done);
    // kMac: the payload is more additional data (no output buffer); kAead: it is encrypted.
    unsigned char* to = encrypts() ? reinterpret_cast<unsigned char*>(out + done) : nullptr;
    if (EVP_CipherUpdate(ctx_, to, &written, in, piece) != 1) crypto_failed("AES-256-GCM seal");
  }
  if (EVP_CipherFinal_ex(ctx_, nullptr, &written) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_GET_TAG, kTagBytes, tag) != 1) {
    crypto_failed("AES-256-GCM tag");
  }
}

bool FrameProtection::open_numbered(uint64_t number, const FrameHeader& header, char* payload, uint64_t nbytes,
                                    const unsigned char* tag) {
  if (mode_ == WireSecurity::kNone) return true;
  start_frame(number, header, /*sealing=*/false);
  int written;
  for (uint64_t done = 0; done < nbytes; done += kMaxPiece) {
    const int piece = static_cast<int>(std::min(kMaxPiece, nbytes - done));
    auto* bytes = reinterpret_cast<unsigned char*>(payload + done);
    if (EVP_CipherUpdate(ctx_, encrypts() ? bytes : nullptr, &written, bytes, piece) != 1) return false;
  }
  unsigned char expected[kTagBytes];
  std::memcpy(expected, tag, kTagBytes);
  return EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_TAG, kTagBytes, expected) == 1 &&
         EVP_CipherFinal_ex(ctx_, nullptr, &written) == 1;
}

}  // namespace collectives
