#pragma once
// Private: starting and reaping child processes.
#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
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
/// dispositions, connected by pipes. Returns an error code (errno of exec) on failure.
std::error_code spawn_piped(const std::vector<std::string>& argv, const std::string& argv0, spawned& out);

/// Reap `pid` without blocking the broker: poll waitpid for up to `grace`, then
/// SIGKILL and reap. `done` runs on the broker thread when the child is gone.
void reap_child(const std::shared_ptr<broker>& b, pid_t pid, std::chrono::milliseconds grace,
                std::function<void()> done);

}  // namespace mitogen::detail
