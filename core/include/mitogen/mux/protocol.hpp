#pragma once
/// The multiplexer's own messages (handles MUX_HELLO..MUX_STOP, wire/constants.hpp):
/// payload encoding and decoding shared by the daemon (mitogen-mux) and its clients.
/// Payloads are restricted-pickle values; docs/protocol.md, "Multiplexer handles".
#include <cstdint>
#include <optional>
#include <string>
#include <system_error>

#include "mitogen/wire/message.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen::mux {

/// Version of these payloads, sent in MUX_HELLO. A client refuses another.
inline constexpr std::int64_t protocol_version = 1;

/// MUX_HELLO: the first frame the daemon sends a client it accepted.
struct hello {
  std::uint32_t context_id = 0;  ///< the client's id in the daemon's router
  std::int64_t version = protocol_version;
  std::int64_t pid = 0;  ///< the daemon's process id
};
/// Payload of MUX_HELLO: `{'context_id': int, 'version': int, 'pid': int}`.
std::string encode_hello(const hello& h);
/// nullopt if `data` is not a MUX_HELLO payload.
std::optional<hello> decode_hello(const std::string& data);

/// Error kinds in replies: the code's error_name() (auth_failed,
/// host_key_mismatch, ...; mitogen/context/errors.hpp, whose error_from_name()
/// reads them back), "bad_request" (a connection stack that cannot be used, or a
/// malformed payload), "too_many_contexts", "shutting_down" or "error".
std::string error_kind(std::error_code ec);

/// A failure reply: `{'error': kind, 'message': text}`.
std::string encode_error(const std::string& kind, const std::string& message);
/// A MUX_CONNECT success: the tuple `(context_id, name)` of the stack's innermost context.
std::string encode_connected(std::uint32_t context_id, const std::string& name);

/// Decode a reply to any MUX request. Throws: channel_error (a dead reply: the
/// daemon went away or refused the request), stream_error with the errc when the
/// reply is an error of that kind, stack_error for "bad_request", mitogen::error
/// for the other kinds, stream_error(protocol_error) for an undecodable reply.
wire::value decode_reply(const wire::message& m);

}  // namespace mitogen::mux
