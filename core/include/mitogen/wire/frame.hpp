#pragma once
/// Frame header encoding and an incremental frame parser. Pure: no I/O.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>

#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/error.hpp"
#include "mitogen/wire/message.hpp"

namespace mitogen::wire {

/// Write the 26-byte header of `m` (length = m.data.size()) into `out`.
void encode_header(const message& m, std::uint8_t* out) noexcept;

/// Header followed by payload, ready to write.
std::string encode_frame(const message& m);

/// Incremental frame parser: feed it bytes in any chunking, get whole messages.
/// Not thread-safe; one per inbound stream (owned by the stream, used on the broker thread).
class frame_parser {
 public:
  enum class status { need_more, good, bad };

  explicit frame_parser(std::uint32_t max_message_size = default_max_message_size) noexcept
      : max_(max_message_size) {}

  /// Consume bytes from the front of `in` (advancing it). Returns `good` as soon as
  /// one message is complete (moved into `out`; the rest of `in` is left unconsumed),
  /// `need_more` when `in` is exhausted mid-frame, `bad` on a refused header (`error()`
  /// says why). After `bad` the parser stays bad: the stream must be dropped.
  status parse(std::span<const std::uint8_t>& in, message& out);

  /// Why the last parse() returned `bad`.
  std::error_code error() const noexcept { return ec_; }
  /// True when no partial frame is buffered.
  bool idle() const noexcept { return have_header_ == 0 && !in_payload_; }

 private:
  std::uint32_t max_;
  std::uint8_t hdr_[header_len] = {};
  std::size_t have_header_ = 0;
  bool in_payload_ = false;
  std::size_t need_ = 0;  ///< payload bytes still missing
  message cur_;
  std::error_code ec_;
};

}  // namespace mitogen::wire
