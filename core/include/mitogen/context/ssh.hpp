#pragma once
/// SSH contexts: a Python agent on another host, reached over SSH. By default the SSH
/// client is in-process (libssh2 on the broker thread: no ssh process per host,
/// handshakes of many hosts run concurrently); transport::openssh runs the system
/// `ssh` binary instead, for what libssh2 cannot do. See docs/ssh.md.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mitogen/context/context.hpp"
#include "mitogen/context/local.hpp"
#include "mitogen/routing/router.hpp"

namespace mitogen {

/// How the server's host key is checked against known_hosts.
enum class host_key_policy {
  enforce,  ///< unknown or changed keys are refused
  accept,   ///< unknown keys are added to known_hosts; changed keys are refused
  ignore,   ///< no check at all (throw-away hosts, tests)
};

/// Which SSH client carries the connection.
enum class ssh_transport {
  libssh2,  ///< in-process, on the broker thread (default)
  openssh,  ///< the system `ssh` binary, one process per context (ProxyJump, GSSAPI, ControlMaster...)
};

/// Options of ssh(). Unset optional fields come from ~/.ssh/config (libssh2
/// transport; the openssh transport lets `ssh` read its own config), then from the
/// defaults named here. connect_options::connect_timeout bounds everything: name
/// lookup, TCP connect, handshake, authentication and bootstrap.
/// connect_options::python_path empty means: try python3, /usr/bin/python3, python on
/// the remote host, in that order (needs a POSIX login shell there).
struct ssh_options : connect_options {
  std::string hostname;                ///< name or address; may be a ~/.ssh/config Host alias
  std::optional<std::uint16_t> port;   ///< default: config Port, else 22
  std::optional<std::string> username; ///< default: config User, else the local user
  /// Used for "password" and "keyboard-interactive" authentication (every prompt is
  /// answered with it). libssh2 transport only.
  std::optional<std::string> password;
  /// Private keys tried in order (a "<file>.pub" beside each is used if present).
  /// Default: config IdentityFile, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa (those that
  /// exist). Unencrypted keys only with the libssh2 transport.
  std::vector<std::string> identity_files;
  /// Offer the keys of the agent at SSH_AUTH_SOCK first (libssh2: done over a blocking
  /// UNIX socket on the broker thread, which is local and fast).
  bool use_agent = true;
  /// The agent's socket; default $SSH_AUTH_SOCK of this process. (The multiplexer
  /// daemon passes each client's own, so that a worker's agent is the one asked.)
  std::optional<std::string> agent_socket;
  host_key_policy check_host_keys = host_key_policy::enforce;
  /// Default: ~/.ssh/known_hosts.
  std::optional<std::string> known_hosts_file;
  /// Seconds between keepalives; 0 disables. A connection whose server stays silent
  /// for keepalive_interval * keepalive_count is declared dead.
  std::chrono::seconds keepalive_interval{15};
  int keepalive_count = 3;
  bool compression = false;
  /// Client config to read (libssh2 transport). Default ~/.ssh/config; "" reads none.
  std::optional<std::string> ssh_config_file;
  ssh_transport transport = ssh_transport::libssh2;
  /// openssh transport: the binary and extra arguments placed before the host name
  /// (e.g. {"-o", "ProxyJump=bastion"}).
  std::string ssh_path = "ssh";
  std::vector<std::string> ssh_args;
};

/// Connect to `opts.hostname`, start the agent there and wait for its bootstrap. Any
/// thread except the broker's; many threads may connect at once (the handshakes run
/// concurrently on the broker thread). The context is named "ssh.<host>[:<port>]".
/// Throws stream_error: auth_failed, host_key_mismatch (message shows the offered
/// key's SHA256 fingerprint), host_key_unknown, host_unreachable, connect_timeout,
/// child_died or bootstrap_failed (with the remote stderr in the message).
context ssh(router& r, const ssh_options& opts);

}  // namespace mitogen
