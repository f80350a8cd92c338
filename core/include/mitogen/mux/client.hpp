#pragma once
/// A client of the multiplexer daemon: what an Ansible worker uses. It attaches to
/// the daemon's socket, becomes a trusted client of its router (a context id of its
/// own, everything else reached through the daemon), asks for contexts by
/// connection stack and calls them directly. docs/ansible.md, "The multiplexer daemon".
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "mitogen/context/context.hpp"
#include "mitogen/io/broker.hpp"
#include "mitogen/routing/receiver.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/message.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen::mux {

/// Owned by shared_ptr. Its broker (one I/O thread) and router are its own. Every
/// method is thread-safe; blocking ones must not run on its broker thread.
class client : public std::enable_shared_from_this<client> {
 public:
  /// Connect to the daemon listening at `socket_path` and read its MUX_HELLO (within
  /// `timeout`). Throws std::system_error carrying the errno when nothing accepts
  /// there (ENOENT, ECONNREFUSED: no daemon; ECONNRESET: it hung up before
  /// greeting us, as a dying daemon does; EACCES...), stream_error with
  /// protocol_error if the peer is not a mitogen-mux daemon of this version, and
  /// stream_error with connect_timeout if it says nothing in time.
  static std::shared_ptr<client> attach(const std::string& socket_path,
                                        std::chrono::milliseconds timeout = std::chrono::seconds(10));
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Our id in the daemon's router.
  std::uint32_t context_id() const noexcept { return id_; }
  /// The daemon's process id (from MUX_HELLO).
  std::int64_t daemon_pid() const noexcept { return daemon_pid_; }
  /// The process that attached (a forked child must not use this client).
  std::int64_t owner_pid() const noexcept { return owner_pid_; }
  const std::shared_ptr<router>& get_router() const noexcept { return router_; }
  const std::shared_ptr<broker>& get_broker() const noexcept { return broker_; }

  /// Send one request (MUX_CONNECT... with `payload`, a pickled value) and return
  /// the receiver of its reply. If the daemon goes away first, the reply is a dead
  /// message, at once.
  std::shared_ptr<receiver> request(std::uint32_t handle, std::string payload);
  /// The context a MUX_CONNECT reply names (decode_reply() errors are thrown).
  context connected(const wire::message& reply);

  /// MUX_CONNECT: the context of `stack` (a list of hop dicts), started or reused
  /// by the daemon. Blocks until it answered. Throws what decode_reply() throws.
  context connect(const wire::value& stack);
  /// MUX_RESET: shut down the context of `stack` and those started through it.
  /// Returns how many there were.
  std::int64_t reset(const wire::value& stack);
  /// MUX_STATUS: the daemon's state (a dict; docs/protocol.md).
  wire::value status();
  /// MUX_STOP: ask the daemon to end (its contexts shut down). Returns once it
  /// acknowledged.
  void stop();

  /// Hang up: our router and broker shut down (the daemon and its contexts go on).
  /// Idempotent; any thread except our broker's.
  void detach();
  /// In a child forked from the process that attached: forget this client without
  /// touching its broker (whose thread does not exist here) or its connection
  /// (the parent's), and keep its objects alive forever (destroying them would
  /// wait for that thread). Idempotent.
  void abandon();
  /// True after detach() or abandon().
  bool detached() const noexcept { return detached_; }
  /// True while the connection to the daemon is up (false once it went away).
  bool connected() const;

 private:
  client() = default;
  wire::value call(std::uint32_t handle, std::string payload);

  std::shared_ptr<broker> broker_;
  std::shared_ptr<router> router_;
  int fd_ = -1;
  std::uint32_t id_ = 0;
  std::int64_t daemon_pid_ = 0;
  std::int64_t owner_pid_ = 0;
  std::atomic<bool> detached_{false};
};

}  // namespace mitogen::mux
