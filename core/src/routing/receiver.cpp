#include "mitogen/routing/receiver.hpp"

#include "mitogen/errors.hpp"
#include "mitogen/routing/router.hpp"

namespace mitogen {

receiver::~receiver() {
  if (auto r = router_.lock()) r->del_handler(handle_);
}

void receiver::push(wire::message&& m) {
  std::function<void()> notify;
  {
    std::lock_guard lk(mu_);
    q_.push_back(std::move(m));
    notify = notify_;
  }
  cv_.notify_all();
  if (notify) notify();
}

void receiver::close(const std::string& reason) {
  if (auto r = router_.lock()) r->del_handler(handle_);
  std::function<void()> notify;
  {
    std::lock_guard lk(mu_);
    if (dead_ && q_.empty()) return;
    q_.clear();
    auto m = wire::message::dead(0, handle_, reason);
    if (auto r = router_.lock()) m.src_id = m.dst_id = r->context_id();
    dead_ = std::move(m);
    notify = notify_;
  }
  cv_.notify_all();
  if (notify) notify();
}

std::size_t receiver::size() {
  std::lock_guard lk(mu_);
  return q_.empty() && dead_ ? 1 : q_.size();
}

std::size_t receiver::set_notify(std::function<void()> fn) {
  std::lock_guard lk(mu_);
  notify_ = std::move(fn);
  return q_.empty() && dead_ ? 1 : q_.size();
}

wire::message receiver::get(std::optional<std::chrono::steady_clock::duration> timeout) {
  if (timeout) {
    auto m = get_for(*timeout);
    if (!m) throw timeout_error("receive timed out");
    return std::move(*m);
  }
  std::unique_lock lk(mu_);
  cv_.wait(lk, [&] { return !q_.empty() || dead_.has_value(); });
  return pop_locked();
}

std::optional<wire::message> receiver::get_for(std::chrono::steady_clock::duration timeout) {
  std::unique_lock lk(mu_);
  if (!cv_.wait_for(lk, timeout, [&] { return !q_.empty() || dead_.has_value(); })) return std::nullopt;
  return pop_locked();
}

wire::message receiver::pop_locked() {
  if (q_.empty()) return *dead_;
  wire::message m = std::move(q_.front());
  q_.pop_front();
  // A dead message ends the channel: keep answering it.
  if (m.is_dead()) dead_ = m;
  return m;
}

std::optional<wire::message> receiver::try_get() {
  std::lock_guard lk(mu_);
  if (q_.empty()) return dead_;
  return pop_locked();
}

}  // namespace mitogen
