#pragma once
/// Where the multiplexer daemon lives on disk: its private directory, socket, lock
/// file and log, and the lock that makes it one daemon per socket.
#include <memory>
#include <string>

namespace mitogen::mux {

/// Environment variable naming the socket (default: default_socket_path()).
inline constexpr const char* socket_env = "MITOGEN_MUX_SOCKET";

/// `$TMPDIR/mitogen-<euid>` (TMPDIR default /tmp): the private directory the debug
/// logs use too (plugin/mitogen_native/core.py private_tmp_dir()).
std::string private_dir();
/// Eight hex digits naming an installation: FNV-1a (32 bits) of the real path of
/// `install_dir`, the directory that holds the mitogen_native package (and
/// mitogen_native_target.py). The Python client computes the same.
std::string install_tag(const std::string& install_dir);
/// `$MITOGEN_MUX_SOCKET` if set, else `private_dir()/mux-<install_tag>.sock`: one
/// daemon per user and installation, so that two installations (two build trees,
/// an upgrade) never talk to each other's daemon.
std::string default_socket_path(const std::string& install_dir);
/// The lock file beside a socket: `<socket>.lock`.
std::string lock_path(const std::string& socket_path);
/// The default log file: `private_dir()/mux.log`.
std::string default_log_path();

/// Make sure `dir` is a directory of ours that nobody else can use: created mode
/// 0700 if missing (its parent must exist), else it must be a real directory (not a
/// symlink) owned by our euid with no group/other permission bits. Returns "" if
/// so, else why not.
std::string check_private_dir(const std::string& dir);

/// An exclusive flock on the lock file: whoever holds it is the daemon of that
/// socket. Released when destroyed (or when the process dies, by the kernel).
class instance_lock {
 public:
  /// Take the lock without waiting: nullptr if another process holds it. Throws
  /// mitogen::error if the file cannot be opened (its directory must already be
  /// checked with check_private_dir). Writes our pid into the file.
  static std::unique_ptr<instance_lock> try_acquire(const std::string& path);
  ~instance_lock();
  instance_lock(const instance_lock&) = delete;
  instance_lock& operator=(const instance_lock&) = delete;
  /// After fork(): the child holds the lock now (the open file description is
  /// shared); record its pid.
  void update_pid();

 private:
  explicit instance_lock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace mitogen::mux
