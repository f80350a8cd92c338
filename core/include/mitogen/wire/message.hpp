#pragma once
/// One protocol message: header fields plus payload bytes.
#include <cstdint>
#include <string>

#include "mitogen/wire/constants.hpp"

namespace mitogen::wire {

/// A message as carried by a frame. Plain value type; owns its payload.
struct message {
  std::uint32_t dst_id = 0;
  std::uint32_t src_id = 0;
  std::uint32_t auth_id = 0;
  std::uint32_t handle = 0;
  std::uint32_t reply_to = 0;
  std::string data;  ///< payload bytes (pickle, log text, or a dead reason)

  /// True if this is a dead message (reply_to == IS_DEAD).
  bool is_dead() const noexcept { return reply_to == IS_DEAD; }

  /// A dead message to (dst_id, handle) carrying a UTF-8 reason.
  static message dead(std::uint32_t dst_id, std::uint32_t handle, std::string reason) {
    message m;
    m.dst_id = dst_id;
    m.handle = handle;
    m.reply_to = IS_DEAD;
    m.data = std::move(reason);
    return m;
  }
};

}  // namespace mitogen::wire
