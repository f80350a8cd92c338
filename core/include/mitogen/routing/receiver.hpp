#pragma once
/// Receiver: a queue of messages arriving on one handle, waited on by user threads.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "mitogen/io/broker.hpp"
#include "mitogen/wire/message.hpp"

namespace mitogen {

class router;
class stream;

/// Where a thread reads one receiver's reply itself (router::begin_lead_for), and
/// whose reply it may take there.
struct lead_plan {
  std::shared_ptr<stream> s;
  std::uint32_t want = 0;  ///< the receiver's respondent
  std::uint32_t from = 0;  ///< the direct context s leads to
  bool via_parent = false;
};

/// Created by router::make_receiver(). The router's broker thread pushes messages;
/// any thread may get(). Destroying the receiver removes its handler.
class receiver {
 public:
  ~receiver();
  receiver(const receiver&) = delete;
  receiver& operator=(const receiver&) = delete;

  /// The handle messages for this receiver are addressed to.
  std::uint32_t handle() const noexcept { return handle_; }

  /// Wait for the next message. A dead message (the respondent disconnected, the
  /// router shut down, or the peer closed the channel) is returned like any other;
  /// once a dead message was returned, later get()s return it again at once.
  /// Throws timeout_error when `timeout` passes first.
  wire::message get(std::optional<std::chrono::steady_clock::duration> timeout = std::nullopt);

  /// As get(), without the exception: the next message, or nothing when `timeout`
  /// passes first. For callers that wait in slices (to run signal handlers between
  /// them): an expected outcome is not an exception.
  std::optional<wire::message> get_for(std::chrono::steady_clock::duration timeout);

  /// Call on the thread that waits for this receiver's reply next, before the request
  /// goes out: that thread starts reading the reply's stream now (router::
  /// begin_lead_for), so that a reply quicker than the send's return cannot wake the
  /// broker first. Its next get()/get_for() goes on from there; if it never waits,
  /// the destructor steps down. Does nothing where the thread could not lead anyway.
  void lead_first();

  /// Non-blocking: the next message if one is queued.
  std::optional<wire::message> try_get();

  /// Called on the broker thread by the router (or on a thread reading the reply
  /// itself, router::lead_for).
  void push(wire::message&& m);

  /// End the channel locally: drop what is queued and answer every get(), now and
  /// later, with a dead message carrying `reason`. Also removes the handler. Any thread.
  void close(const std::string& reason);

  /// Messages queued (a dead message that ended the channel counts as one).
  std::size_t size();

  /// Have `fn` called after every push()/close() (on the pushing thread, the broker's
  /// usually, without the receiver's lock; it must not block). Returns size() at the
  /// moment it was installed, so the caller can account for what is already queued.
  /// An empty `fn` removes the notification.
  std::size_t set_notify(std::function<void()> fn);

 private:
  friend class router;
  receiver(std::weak_ptr<router> r, std::uint32_t handle) : router_(std::move(r)), handle_(handle) {}
  /// The next message, or the dead one that ended the channel; mu_ held, one ready.
  wire::message pop_locked();
  /// get()/get_for(): lead if the router lets this thread read the reply itself,
  /// else wait on cv_. nullopt once `deadline` passes.
  std::optional<wire::message> wait_until(std::optional<std::chrono::steady_clock::time_point> deadline);
  bool ready();  ///< something (a message or the end) is queued

  std::weak_ptr<router> router_;
  std::uint32_t handle_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<wire::message> q_;
  std::optional<wire::message> dead_;
  std::function<void()> notify_;  ///< guarded by mu_; called without it
  std::unique_ptr<broker::follower> notify_follower_;  ///< while notify_ is set
  /// While a thread leads for this receiver: its eventfd, poked by push() from any
  /// other thread (guarded by mu_, so the descriptor stays open while poked).
  int leader_wake_fd_ = -1;
  std::thread::id leader_thread_;
  /// lead_first()'s plan (its stream led), until leader_thread_ waits (or the
  /// receiver goes).
  std::optional<lead_plan> led_;
};

}  // namespace mitogen
