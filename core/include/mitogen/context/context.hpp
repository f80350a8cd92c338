#pragma once
/// Context: a handle on one remote Python interpreter, through which calls are made.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "mitogen/routing/receiver.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen {

/// What to call: `module.function` or `module.class_name.function`.
struct call_spec {
  std::string module;
  std::string function;
  std::optional<std::string> class_name;
  wire::tuple args;
  wire::kwargs kwargs;
};

/// Turn a call's reply into its value. Throws call_error (the remote raised),
/// channel_error (dead reply: the context died or refused), or stream_error with
/// errc::protocol_error (the reply broke the codec rules; the context is then
/// disconnected by the caller via `on_bad_reply`).
wire::value reply_value(const wire::message& m);

/// Cheap to copy; thread-safe. Keeps its router alive.
class context {
 public:
  context(std::shared_ptr<router> r, std::uint32_t id, std::string name)
      : router_(std::move(r)), id_(id), name_(std::move(name)) {}

  std::uint32_t id() const noexcept { return id_; }
  const std::string& name() const noexcept { return name_; }
  const std::shared_ptr<router>& get_router() const noexcept { return router_; }

  /// The CALL_FUNCTION message for `spec` (payload encoded, dst set, no reply_to).
  /// Specs are taken by value: pass an rvalue to avoid copying big arguments.
  wire::message make_call(call_spec spec) const;

  /// Send a call; the receiver gets exactly one reply (or a dead message if the
  /// context disconnects first). Any thread.
  /// `wait_here`: the calling thread waits for the reply next, so it starts reading
  /// for it before the call goes out (receiver::lead_first); any other thread may
  /// still wait on the receiver.
  std::shared_ptr<receiver> call_async(call_spec spec, bool wait_here = false) const;
  /// Send `m` (a prepared call) and return the receiver for its reply.
  std::shared_ptr<receiver> send_async(wire::message m, bool wait_here = false) const;
  /// Blocking call; see reply_value() for what it throws. `timeout` bounds the wait
  /// (timeout_error), it does not cancel the remote call.
  wire::value call(call_spec spec,
                   std::optional<std::chrono::steady_clock::duration> timeout = std::nullopt) const;
  /// Decode a reply received for a call to this context; disconnects the context if
  /// the reply broke the codec rules.
  wire::value result(const wire::message& m) const;
  /// Fire and forget: failures are only logged by the child.
  void call_no_reply(call_spec spec) const;
  /// Ask the context to exit. With `wait`, block until it disconnected (at most
  /// `timeout`; returns false if it did not).
  bool shutdown(bool wait = false, std::chrono::milliseconds timeout = std::chrono::seconds(5)) const;

 private:
  std::shared_ptr<router> router_;
  std::uint32_t id_;
  std::string name_;
};

}  // namespace mitogen
