#pragma once
/// Receiver: a queue of messages arriving on one handle, waited on by user threads.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "mitogen/wire/message.hpp"

namespace mitogen {

class router;

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

  /// Non-blocking: the next message if one is queued.
  std::optional<wire::message> try_get();

  /// Called on the broker thread by the router.
  void push(wire::message&& m);

  /// How long get() watches for a message before sleeping.
  static constexpr std::chrono::microseconds spin_for{0};

 private:
  friend class router;
  receiver(std::weak_ptr<router> r, std::uint32_t handle) : router_(std::move(r)), handle_(handle) {}

  std::weak_ptr<router> router_;
  std::uint32_t handle_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<wire::message> q_;
  std::optional<wire::message> dead_;
  std::atomic<bool> pending_{false};  ///< q_ non-empty (read without the lock while spinning)
};

}  // namespace mitogen
