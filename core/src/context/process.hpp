#pragma once
// Private: starting and reaping child processes.
#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "mitogen/io/broker.hpp"

namespace mitogen::detail {

/// A started child: our ends of its stdin, stdout and stderr (all O_CLOEXEC).
struct spawned {
  pid_t pid = -1;
  int stdin_w = -1;
  int stdout_r = -1;
  int stderr_r = -1;
};

/// Start `argv` (argv[0] shown as `argv0`) in a new session with default signal
/// dispositions, connected by pipes, with `env` ("NAME=value" entries) as its
/// environment if given, else ours. Returns an error code (errno of exec) on failure.
std::error_code spawn_piped(const std::vector<std::string>& argv, const std::string& argv0, spawned& out,
                            const std::vector<std::string>* env = nullptr);

/// A started child with a terminal of its own besides the pipes.
struct spawned_tty : spawned {
  int tty_master = -1;  ///< our side of the terminal (O_CLOEXEC, blocking)
  /// A descriptor on the terminal's child side, kept by us: while it is open, reading
  /// tty_master never fails with EIO just because the child has not opened /dev/tty
  /// yet (or has closed it). Keep it as long as tty_master is read.
  int tty_slave = -1;
};

/// As spawn_piped(), and the child's controlling terminal is a new pseudo-terminal
/// (echo off) whose master side is ours: programs that insist on a terminal for a
/// password prompt (sudo, doas) open /dev/tty and get it, while stdin, stdout and
/// stderr stay the pipes. Closing tty_master hangs the terminal up (SIGHUP to the
/// child), so keep it open for the child's lifetime.
std::error_code spawn_with_tty(const std::vector<std::string>& argv, const std::string& argv0, spawned_tty& out);

/// The interpreter command to start: `python_path` if given, else /usr/bin/python3 if it
/// is executable here, else `python3` from PATH.
std::vector<std::string> python_argv(const std::vector<std::string>& python_path);

/// Quote for a POSIX shell: '...' with ' written as '\''.
std::string sh_quote(std::string_view s);

/// Reap `pid` without blocking the broker: poll waitpid for up to `grace`, then
/// SIGKILL and reap. `done` runs on the broker thread when the child is gone;
/// `on_status`, if set, first gets its wait status (for error messages).
void reap_child(const std::shared_ptr<broker>& b, pid_t pid, std::chrono::milliseconds grace,
                std::function<void()> done, std::function<void(int)> on_status = {});

}  // namespace mitogen::detail
