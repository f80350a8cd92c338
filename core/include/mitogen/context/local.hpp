#pragma once
/// Local contexts: a Python subprocess bootstrapped over pipes.
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "mitogen/context/context.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/constants.hpp"

namespace mitogen {

/// Options shared by every connection method.
struct connect_options {
  /// Interpreter argv prefix, e.g. {"/usr/bin/python3"} or {"/usr/bin/env", "python3"}.
  /// Empty: /usr/bin/python3 if it exists, else python3 from PATH.
  std::vector<std::string> python_path;
  /// argv[0] becomes "mitogen:<remote_name>"; default "<user>@<host>:<our pid>".
  std::optional<std::string> remote_name;
  std::chrono::milliseconds connect_timeout{30000};
  /// Child writes a DEBUG log of its own to $TMPDIR/mitogen-<uid>/mitogen.<pid>.log.
  bool debug = false;
  /// Level of log records the child forwards (Python logging numbers).
  int log_level = 20;
  std::uint32_t max_message_size = wire::default_max_message_size;
  /// Start the context through this one instead of from here (docs/via.md): its
  /// agent spawns the child, routes for it, and serves it modules from its cache.
  /// The new context's id is allocated here; calls to it travel through `via`.
  std::optional<context> via;
};

/// What a custom_boot hook is told about the context being started.
struct boot_params {
  std::uint32_t context_id = 0;
  std::uint32_t parent_id = 0;
  std::string remote_name;
  bool debug = false;
  int log_level = 20;
  std::uint32_t max_message_size = wire::default_max_message_size;
};

/// A complete first stage of someone else's making: the argv to spawn and the bytes
/// to write once it printed MITO000. The child must then print MITO001 and speak the
/// framed protocol on its stdin/stdout.
struct custom_boot {
  std::vector<std::string> argv;
  std::string preamble;
};

/// Options of local().
struct local_options : connect_options {
  /// Conformance testing: start the child with what this returns instead of our
  /// stage 1 and agent, e.g. upstream Mitogen's own first stage and core.py
  /// (tests/core/conformance, docs/security.md "Conformance"). python_path is ignored.
  std::function<custom_boot(const boot_params&)> boot_with;
  /// The child's whole environment ("NAME=value" entries), if not ours. (The
  /// multiplexer daemon starts a client's local contexts with the client's.)
  /// Ignored with `via`.
  std::optional<std::vector<std::string>> environment;
};

/// Start a local context and wait for its bootstrap (with `opts.via`: a Python
/// subprocess of that context, on its host). Any thread except the broker's.
/// Throws stream_error (spawn_failed, bootstrap_failed, connect_timeout, child_died)
/// with the child's stderr in the message when it had any.
context local(router& r, const local_options& opts = {});

/// The default remote_name: "<user>@<host>:<pid>".
std::string default_remote_name();

}  // namespace mitogen
