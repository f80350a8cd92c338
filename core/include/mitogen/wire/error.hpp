#pragma once
/// Typed errors of the wire layer (framing and the restricted pickle codec).
#include <string>
#include <system_error>

namespace mitogen::wire {

/// What went wrong decoding bytes from a peer. Every value means "refused".
enum class errc {
  bad_magic = 1,          ///< frame header magic is not 0x4d49
  message_too_large,      ///< frame length or payload exceeds the configured maximum
  truncated,              ///< input ended inside an opcode or before STOP
  unknown_opcode,         ///< opcode outside the allowed subset
  forbidden_global,       ///< GLOBAL / STACK_GLOBAL names something not allowed
  bad_reduce,             ///< REDUCE of an allowed callable with the wrong arguments
  too_deep,               ///< nesting deeper than the configured limit
  too_many_nodes,         ///< value larger than the node budget (memo bombs)
  stack_error,            ///< stack underflow, missing MARK, wrong stack shape at STOP
  bad_memo,               ///< GET of a memo slot never PUT
  bad_utf8,               ///< text that is not valid UTF-8
  unhashable_key,         ///< dict key that Python could not hash (list, dict, bytearray)
  trailing_data,          ///< bytes after STOP
  bad_protocol,           ///< PROTO other than 2 or 3
  invalid_value,          ///< value out of range (negative context id, huge length, ...)
};

/// The error category named "mitogen.wire".
const std::error_category& wire_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), wire_category()};
}

}  // namespace mitogen::wire

template <>
struct std::is_error_code_enum<mitogen::wire::errc> : std::true_type {};
