#pragma once
/// Settings of the multiplexer daemon, read from a YAML file (docs/ansible.md,
/// "The multiplexer daemon").
#include <chrono>
#include <cstddef>
#include <string>

#include "mitogen/errors.hpp"

namespace mitogen::mux {

/// Environment variable naming the settings file (default: default_config_path()).
inline constexpr const char* config_env = "MITOGEN_MUX_CONFIG";
/// Environment variable naming the directory the module mitogen_native_target is
/// served from; wins over the file's module_dir.
inline constexpr const char* module_dir_env = "MITOGEN_MUX_MODULE_DIR";

/// What the daemon is told. Plain value type; the defaults are the documented ones.
struct config {
  /// The daemon exits once no client has been attached for this long; 0: as soon
  /// as the last client detaches.
  std::chrono::seconds idle_timeout{60};
  /// Contexts kept at most; beyond it the least recently used idle ones are shut down.
  std::size_t max_contexts = 1000;
  /// Log file; "" means default_log_path(). A leading "~/" is the home directory.
  std::string log_file;
  /// spdlog level name: trace, debug, info, warning, error, critical, off.
  std::string log_level = "info";
  /// Where mitogen_native_target.py is; "" means next to the installed package.
  std::string module_dir;
  /// Threads that start contexts (each blocks for one connection attempt).
  std::size_t connect_threads = 16;
};

/// A settings file that cannot be used. what() is "<file>:<line>: <key>: <why>".
class config_error : public error {
 public:
  using error::error;
};

/// `$XDG_CONFIG_HOME/mitogen-native/mux.yaml` (default `~/.config/...`).
std::string default_config_path();
/// Parse settings from YAML text; `path` is only used in error messages.
/// Throws config_error naming the line and key of the first problem.
config parse_config(const std::string& text, const std::string& path);
/// Read a settings file. A missing file gives the defaults unless `must_exist`.
config load_config(const std::string& path, bool must_exist);

}  // namespace mitogen::mux
