#pragma once
// Private: one in-process SSH connection (libssh2) driven by the broker's io_context.
//
// Connecting is a coroutine on the broker thread: resolve, TCP connect, handshake,
// host key check, authentication, channel open, exec. Every libssh2 call that answers
// LIBSSH2_ERROR_EAGAIN waits for the socket in the direction(s)
// libssh2_session_block_directions() names, then is called again, so any number of
// connections handshake concurrently on the one thread.
//
// Once the remote command runs, a pump bridges the channel to one end of a UNIX
// socketpair whose other end is an ordinary mitogen::stream: channel stdout -> bridge,
// bridge -> channel stdin, channel stderr -> the boot stderr sink. The pump is level-
// triggered and flow-controlled: it reads no more from the channel while the bridge
// is full (the SSH window then stops the remote writer), and no more from the bridge
// while the channel cannot take what it holds.
#include <utility>  // before Asio (Boost 1.74 + C++20)

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bootstrap.hpp"
#include "mitogen/context/ssh.hpp"
#include "mitogen/io/broker.hpp"

namespace mitogen::detail {

/// Everything the session needs, resolved from ssh_options and ~/.ssh/config.
struct ssh_target {
  std::string host;  ///< to connect to, and the name looked up in known_hosts
  std::uint16_t port = 22;
  std::string user;
  std::optional<std::string> password;
  std::vector<std::string> identity_files;  ///< expanded paths; missing ones are skipped
  bool use_agent = true;
  std::optional<std::string> agent_socket;  ///< default: $SSH_AUTH_SOCK
  host_key_policy policy = host_key_policy::enforce;
  std::string known_hosts_file;
  std::chrono::seconds keepalive_interval{15};
  int keepalive_count = 3;
  bool compression = false;
  std::string command;  ///< the remote command (runs in the login shell)
  std::string name;     ///< context name, for logs
};

class ssh_session;

/// Start connecting (posted to the broker thread). `bridge_fd` (taken over) is our end
/// of the socketpair; failures before the bootstrap are reported through `boot`.
/// Returns a handle whose close() ends the session (the router's teardown).
std::shared_ptr<ssh_session> start_ssh_session(std::shared_ptr<broker> b, ssh_target t, int bridge_fd,
                                               std::shared_ptr<boot_state> boot);

/// End the session (SSH disconnect, close the socket and the bridge). Broker thread;
/// idempotent.
void close_ssh_session(const std::shared_ptr<ssh_session>& s);

}  // namespace mitogen::detail
