#include "mitogen/routing/receiver.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include "mitogen/errors.hpp"
#include "mitogen/routing/router.hpp"

namespace mitogen {
namespace {

/// This thread's eventfd for waking it while it leads (stream::lead()); made on
/// first use, closed when the thread ends.
int thread_wake_fd() {
  struct holder {
    int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ~holder() {
      if (fd >= 0) ::close(fd);
    }
  };
  thread_local holder h;
  return h.fd;
}

void poke(int fd) {
  std::uint64_t one = 1;
  (void)!::write(fd, &one, sizeof one);
}

}  // namespace

receiver::~receiver() {
  if (led_) led_->s->end_lead(leader_thread_);  // lead_first() without a wait
  if (auto r = router_.lock()) r->del_handler(handle_);
}

void receiver::lead_first() {
  int fd = thread_wake_fd();
  if (fd < 0) return;
  {
    std::lock_guard lk(mu_);
    if (leader_wake_fd_ >= 0) return;
    leader_wake_fd_ = fd;
    leader_thread_ = std::this_thread::get_id();
  }
  std::optional<lead_plan> p;
  if (auto r = router_.lock()) p = r->begin_lead_for(*this, fd);
  std::lock_guard lk(mu_);
  if (p) {
    led_ = std::move(p);
  } else {
    leader_wake_fd_ = -1;
    leader_thread_ = {};
  }
}

void receiver::push(wire::message&& m) {
  std::function<void()> notify;
  {
    std::lock_guard lk(mu_);
    q_.push_back(std::move(m));
    notify = notify_;
    if (leader_wake_fd_ >= 0 && leader_thread_ != std::this_thread::get_id()) poke(leader_wake_fd_);
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
    if (leader_wake_fd_ >= 0 && leader_thread_ != std::this_thread::get_id()) poke(leader_wake_fd_);
  }
  cv_.notify_all();
  if (notify) notify();
}

std::size_t receiver::size() {
  std::lock_guard lk(mu_);
  return q_.empty() && dead_ ? 1 : q_.size();
}

std::size_t receiver::set_notify(std::function<void()> fn) {
  // A select waits on this receiver: the broker reads for it, so streams must not
  // stay parked meanwhile (broker::follower). Made and dropped outside mu_.
  std::unique_ptr<broker::follower> f;
  if (fn) {
    if (auto r = router_.lock()) f = std::make_unique<broker::follower>(r->get_broker());
  }
  std::lock_guard lk(mu_);
  notify_ = std::move(fn);
  f.swap(notify_follower_);
  return q_.empty() && dead_ ? 1 : q_.size();
}

wire::message receiver::get(std::optional<std::chrono::steady_clock::duration> timeout) {
  std::optional<std::chrono::steady_clock::time_point> deadline;
  if (timeout) deadline = std::chrono::steady_clock::now() + *timeout;
  auto m = wait_until(deadline);
  if (!m) throw timeout_error("receive timed out");
  return std::move(*m);
}

std::optional<wire::message> receiver::get_for(std::chrono::steady_clock::duration timeout) {
  return wait_until(std::chrono::steady_clock::now() + timeout);
}

bool receiver::ready() {
  std::lock_guard lk(mu_);
  return !q_.empty() || dead_.has_value();
}

std::optional<wire::message> receiver::wait_until(std::optional<std::chrono::steady_clock::time_point> deadline) {
  auto pred = [&] { return !q_.empty() || dead_.has_value(); };
  // This thread's lead_first(), if any: it leads already.
  std::optional<lead_plan> begun;
  int fd = -1;
  bool lead = false;
  {
    std::unique_lock lk(mu_);
    if (led_ && leader_thread_ == std::this_thread::get_id()) {
      begun.swap(led_);  // led_ empty again
      fd = leader_wake_fd_;
      lead = true;
    } else if (pred()) {
      return pop_locked();
    }
  }
  if (!begun) {
    fd = thread_wake_fd();
    if (fd >= 0) {
      // One thread per receiver reads for it; another waiting on the same receiver
      // waits on cv_ (both are woken by push()).
      std::lock_guard lk(mu_);
      lead = leader_wake_fd_ < 0;
      if (lead) {
        leader_wake_fd_ = fd;
        leader_thread_ = std::this_thread::get_id();
      }
    }
  }
  if (lead) {
    // Read the reply ourselves if we can: one wake-up (ours) instead of two.
    auto st = stream::lead_status::busy;
    if (auto r = router_.lock()) {
      st = r->lead_for(*this, deadline, fd, std::move(begun));
    } else if (begun) {
      begun->s->end_lead();
    }
    {
      std::lock_guard lk(mu_);
      leader_wake_fd_ = -1;
      leader_thread_ = {};
    }
    if (st == stream::lead_status::timed_out && !ready()) return std::nullopt;
  }
  std::unique_lock lk(mu_);
  if (pred()) return pop_locked();
  // The broker delivers what we wait for: it must read every stream meanwhile.
  lk.unlock();
  std::optional<broker::follower> following;
  if (auto r = router_.lock()) following.emplace(r->get_broker());
  lk.lock();
  if (!deadline) {
    cv_.wait(lk, pred);
  } else if (!cv_.wait_until(lk, *deadline, pred)) {
    return std::nullopt;
  }
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
