// Frame header encoding and the incremental frame parser (see docs/protocol.md, "Frame").
#include "mitogen/wire/frame.hpp"

#include <algorithm>
#include <cstring>

namespace mitogen::wire {
namespace {

constexpr std::size_t reserve_ahead = 4u << 20;

void put_u16(std::uint8_t* p, std::uint16_t v) noexcept {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}

void put_u32(std::uint8_t* p, std::uint32_t v) noexcept {
  p[0] = static_cast<std::uint8_t>(v >> 24);
  p[1] = static_cast<std::uint8_t>(v >> 16);
  p[2] = static_cast<std::uint8_t>(v >> 8);
  p[3] = static_cast<std::uint8_t>(v);
}

std::uint16_t get_u16(const std::uint8_t* p) noexcept {
  return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
}

std::uint32_t get_u32(const std::uint8_t* p) noexcept {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}

}  // namespace

void encode_header(const message& m, std::uint8_t* out) noexcept {
  put_u16(out, header_magic);
  put_u32(out + 2, m.dst_id);
  put_u32(out + 6, m.src_id);
  put_u32(out + 10, m.auth_id);
  put_u32(out + 14, m.handle);
  put_u32(out + 18, m.reply_to);
  // The header field is 32 bits; callers keep payloads under max_message_size.
  put_u32(out + 22, static_cast<std::uint32_t>(m.data.size()));
}

std::string encode_frame(const message& m) {
  std::string out;
  out.resize(header_len + m.data.size());
  encode_header(m, reinterpret_cast<std::uint8_t*>(out.data()));
  if (!m.data.empty()) std::memcpy(out.data() + header_len, m.data.data(), m.data.size());
  return out;
}

frame_parser::status frame_parser::parse(std::span<const std::uint8_t>& in, message& out) {
  // Once framing is lost nothing after it can be trusted: stay bad.
  if (ec_) return status::bad;

  if (!in_payload_) {
    std::size_t take = std::min(header_len - have_header_, in.size());
    std::memcpy(hdr_ + have_header_, in.data(), take);
    have_header_ += take;
    in = in.subspan(take);
    if (have_header_ < header_len) return status::need_more;

    // Validate before allocating anything for the payload.
    if (get_u16(hdr_) != header_magic) {
      ec_ = make_error_code(errc::bad_magic);
      return status::bad;
    }
    std::uint32_t length = get_u32(hdr_ + 22);
    if (length > max_) {
      ec_ = make_error_code(errc::message_too_large);
      return status::bad;
    }
    cur_ = message{};
    cur_.dst_id = get_u32(hdr_ + 2);
    cur_.src_id = get_u32(hdr_ + 6);
    cur_.auth_id = get_u32(hdr_ + 10);
    cur_.handle = get_u32(hdr_ + 14);
    cur_.reply_to = get_u32(hdr_ + 18);
    // Reserve up front so chunks append without regrowth, but only up to 4 MiB until
    // the bytes actually arrive: a bare header must not pin 128 MiB per stream.
    cur_.data.reserve(std::min<std::size_t>(length, reserve_ahead));
    need_ = length;
    have_header_ = 0;
    in_payload_ = true;
  }

  std::size_t take = std::min(need_, in.size());
  if (take > 0 && cur_.data.size() + take > cur_.data.capacity())
    cur_.data.reserve(cur_.data.size() + need_);  // the peer is really sending it
  cur_.data.append(reinterpret_cast<const char*>(in.data()), take);
  need_ -= take;
  in = in.subspan(take);
  if (need_ > 0) return status::need_more;

  in_payload_ = false;
  out = std::move(cur_);
  cur_ = message{};
  return status::good;
}

}  // namespace mitogen::wire
