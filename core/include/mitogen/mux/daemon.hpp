#pragma once
/// The multiplexer daemon (mitogen-mux serve): one Broker and one unidirectional
/// Router that own every context of one controller user, shared by the clients
/// (Ansible workers) that attach over a UNIX socket. docs/ansible.md, "The
/// multiplexer daemon"; the messages are in docs/protocol.md.
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "mitogen/io/broker.hpp"
#include "mitogen/mux/config.hpp"
#include "mitogen/mux/paths.hpp"
#include "mitogen/routing/router.hpp"

namespace mitogen {
class module_responder;
}

namespace mitogen::mux {

namespace detail {
class registry;
class listener;
}  // namespace detail

/// What daemon::start() needs.
struct daemon_options {
  /// Where to listen. Its directory must be private (check_private_dir), and the
  /// caller must hold the instance_lock of this socket: an existing socket file
  /// there is a dead daemon's and is replaced.
  std::string socket_path;
  config cfg;
  /// Directory served to contexts for the module mitogen_native_target (and only
  /// it); "" serves nothing.
  std::string module_dir;
  /// Before the first client, wait this long at least (a daemon nobody attaches to
  /// still ends, even with idle_timeout 0).
  std::chrono::milliseconds first_client_grace{10000};
  /// The instance lock of socket_path, held until the daemon retires or shuts down.
  std::shared_ptr<instance_lock> lock;
};

/// Owned by shared_ptr. start() returns it listening; it runs on its broker thread
/// and its connect threads until shutdown(). Thread-safe.
class daemon : public std::enable_shared_from_this<daemon> {
 public:
  /// Create the broker, router and module responder, and listen. Throws
  /// mitogen::error (with the reason) if the socket cannot be made.
  static std::shared_ptr<daemon> start(daemon_options opts);
  ~daemon();
  daemon(const daemon&) = delete;
  daemon& operator=(const daemon&) = delete;

  /// Ask the daemon to end (idle timeout, MUX_STOP, a signal). Any thread,
  /// idempotent; `why` is logged. shutdown() does the work.
  void request_stop(const std::string& why);
  /// Wait until a stop was requested, at most `timeout`. True if it was.
  bool wait_stop_requested(std::chrono::milliseconds timeout);
  /// Stop accepting, remove the socket, ask every context to exit (they get the
  /// router's grace period), join the broker and the connect threads. Blocks; any
  /// thread but the daemon's own; idempotent.
  void shutdown();

  /// True once the daemon retired: its program or the module it serves was
  /// replaced (rebuilt, upgraded), so it let go of its socket and lock for a new
  /// daemon to take, and serves only the clients still attached, then ends.
  bool retired() const;

  /// Clients attached now.
  std::size_t clients() const;
  /// Contexts known (connected or connecting).
  std::size_t contexts() const;
  const std::shared_ptr<router>& get_router() const noexcept { return router_; }
  const std::string& socket_path() const noexcept { return opts_.socket_path; }

 private:
  struct client_info {
    std::int64_t pid = 0;
    std::chrono::steady_clock::time_point since;
  };
  explicit daemon(daemon_options opts);
  void listen();                                   // start()'s helper
  void accept_next();                              // broker thread
  void admit(int fd);                              // broker thread: an accepted socket
  void on_client_gone(std::uint32_t id);           // broker thread
  void arm_idle();                                 // broker thread
  bool is_client(std::uint32_t id) const;          // any thread (router policy)
  void on_connect(wire::message&& m);              // broker thread
  void on_reset(wire::message&& m);                // broker thread
  void on_status(wire::message&& m);               // broker thread
  void on_stop(wire::message&& m);                 // broker thread
  void reply(const wire::message& to, std::string payload);
  void register_handlers();
  /// Why this daemon is out of date ("" if it is not). Broker thread.
  std::string staleness() const;
  /// Close the listener, remove our socket, release the lock. Broker thread.
  void retire(const std::string& why);

  /// What the daemon was started from, to notice when it is replaced.
  struct file_id {
    dev_t dev = 0;
    ino_t ino = 0;
    std::int64_t size = -1;
    std::int64_t mtime_ns = -1;
    bool operator==(const file_id&) const = default;
  };
  static file_id identify(const std::string& path);
  file_id module_id_;

  daemon_options opts_;
  std::shared_ptr<broker> broker_;
  std::shared_ptr<router> router_;
  std::shared_ptr<module_responder> responder_;
  std::shared_ptr<detail::registry> registry_;
  std::shared_ptr<detail::listener> listener_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  mutable std::mutex clients_mu_;
  std::unordered_map<std::uint32_t, client_info> clients_;
  bool had_client_ = false;  // guarded by clients_mu_
  std::atomic<bool> retired_{false};

  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_requested_ = false;
  std::mutex shutdown_mu_;
  bool shut_down_ = false;
};

}  // namespace mitogen::mux
