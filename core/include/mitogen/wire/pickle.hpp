#pragma once
/// The restricted pickle codec (protocol 2 plus protocol 3 bytes opcodes). See docs/protocol.md.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>

#include "mitogen/wire/error.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen::wire {

/// Bounds applied while decoding untrusted bytes.
struct decode_limits {
  std::size_t max_depth = 100;  ///< container nesting (list in list in ... )
  /// Upper bound on values created, including copies made by memo GETs.
  /// 0 means "16 per input byte + 65536".
  std::size_t max_nodes = 0;
};

/// Result of decode(): a value, or an error with a short detail for the log.
struct decode_result {
  value v;
  std::error_code ec;
  std::string detail;  ///< e.g. "global os.system", "opcode 0x81 at offset 12"
  explicit operator bool() const noexcept { return !ec; }
};

/// Decode a pickle. Never throws on bad input (only std::bad_alloc); never reads past `data`.
decode_result decode(std::span<const std::uint8_t> data, const decode_limits& limits = {});
inline decode_result decode(const std::string& data, const decode_limits& limits = {}) {
  return decode({reinterpret_cast<const std::uint8_t*>(data.data()), data.size()}, limits);
}

/// Encode a value. Output starts with PROTO 2 and is readable by CPython's pickle.loads
/// and by decode(). `bytes` use protocol 3's BINBYTES opcodes (see docs/protocol.md).
std::string encode(const value& v);
/// Append the encoding of `v` to `out` (no copy of the prefix).
void encode_to(const value& v, std::string& out);

}  // namespace mitogen::wire
