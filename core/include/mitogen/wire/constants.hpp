#pragma once
/// Protocol constants shared by every layer (Mitogen 0.3 numbering).
#include <cstddef>
#include <cstdint>

namespace mitogen::wire {

/// Frame magic, "MI".
inline constexpr std::uint16_t header_magic = 0x4d49;
/// Bytes in a frame header (`>hLLLLLL`).
inline constexpr std::size_t header_len = 26;
/// Default upper bound on one message's payload.
inline constexpr std::uint32_t default_max_message_size = 128u * 1024u * 1024u;

/// Standard handles.
inline constexpr std::uint32_t BOOTSTRAP = 0;   ///< first frame to a new agent: config
inline constexpr std::uint32_t GET_MODULE = 100;
inline constexpr std::uint32_t CALL_FUNCTION = 101;
inline constexpr std::uint32_t FORWARD_LOG = 102;
inline constexpr std::uint32_t ADD_ROUTE = 103;
inline constexpr std::uint32_t DEL_ROUTE = 104;
inline constexpr std::uint32_t ALLOCATE_ID = 105;
inline constexpr std::uint32_t SHUTDOWN = 106;
inline constexpr std::uint32_t LOAD_MODULE = 107;
inline constexpr std::uint32_t FORWARD_MODULE = 108;
inline constexpr std::uint32_t DETACHING = 109;
inline constexpr std::uint32_t CALL_SERVICE = 110;
inline constexpr std::uint32_t STUB_CALL_SERVICE = 111;
/// The multiplexer's own handles (ours, not upstream's): what an attached client
/// (an Ansible worker) asks the mitogen-mux daemon. See docs/ansible.md.
inline constexpr std::uint32_t MUX_HELLO = 200;    ///< daemon -> new client: its id
inline constexpr std::uint32_t MUX_CONNECT = 201;  ///< client: a context for this connection stack
inline constexpr std::uint32_t MUX_RESET = 202;    ///< client: drop the context of this stack
inline constexpr std::uint32_t MUX_STATUS = 203;   ///< client: list contexts
inline constexpr std::uint32_t MUX_STOP = 204;     ///< client: end the daemon
/// In `reply_to`: the message is dead (channel closed or undeliverable).
inline constexpr std::uint32_t IS_DEAD = 999;
/// First dynamically allocated handle.
inline constexpr std::uint32_t first_dynamic_handle = 1000;

/// The master's context id.
inline constexpr std::uint32_t master_id = 0;

}  // namespace mitogen::wire
