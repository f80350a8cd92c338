#include "mitogen/io/broker.hpp"

#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <system_error>

#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

namespace mitogen {

broker::broker() : work_(boost::asio::make_work_guard(*io_)) {
  // A child dying mid-write must give EPIPE, not kill the controller. Python already
  // ignores SIGPIPE; a C++ host that installed its own handler keeps it.
  struct sigaction old {};
  if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) ::signal(SIGPIPE, SIG_IGN);
  // spdlog creates its default logger on first use, inside libspdlog (not compiled
  // with our sanitizers): two brokers logging first at once would build it on one
  // thread and read it on the other with no ordering a checker can see. Build it
  // here, before this broker's thread exists.
  (void)spdlog::default_logger_raw();
  // A debugging aid (docs/architecture.md, "Parking"): run a suite with a limit of
  // an hour, and whatever would wait for the limit hangs instead of going unseen.
  if (const char* v = std::getenv("MITOGEN_PARK_LIMIT_US")) {
    char* end = nullptr;
    long long us = std::strtoll(v, &end, 10);
    if (end != v && *end == '\0' && us >= 0) park_limit_us_.store(us);
  }
  park_timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  if (park_timer_fd_ < 0) throw std::system_error(errno, std::generic_category(), "timerfd_create");
  park_timer_.assign(park_timer_fd_);
  wait_park_timer();  // before the thread runs: no other thread touches park_timer_
  std::mutex mu;
  std::condition_variable cv;
  bool started = false;
  thread_ = std::thread([&, this, io = io_, orphaned = orphaned_] {
    {
      // Notify under the lock: once the constructor sees `started` it returns and
      // destroys `cv`, which must not still be in use here.
      std::lock_guard lk(mu);
      thread_id_ = std::this_thread::get_id();
      started = true;
      cv.notify_one();
    }
    run(*io);
    if (*orphaned) return;  // destroyed from a handler: `this` is gone
    stopped_.store(true);
    thread_id_.store(std::thread::id());
  });
  // thread_id_ must be visible before anyone asks on_broker_thread().
  std::unique_lock lk(mu);
  cv.wait(lk, [&] { return started; });
}

broker::~broker() {
  if (on_broker_thread()) {
    // The last reference died inside a handler: the thread cannot join itself, and it
    // returns into io_->run() after this. Nothing queued may run any more (shutdown's
    // handlers capture `this`), so stop the loop instead of shutting down; no router
    // is left to need the hooks (each holds a reference). The thread keeps the
    // io_context alive until run() unwinds, then destroys what is still queued.
    *orphaned_ = true;
    shutting_down_.store(true);
    stopped_.store(true);
    io_->stop();
    thread_.detach();
    return;
  }
  shutdown();
  join();
}

void broker::run(boost::asio::io_context& io) {
  for (;;) {
    try {
      io.run();
      break;
    } catch (const std::exception& e) {
      // A handler threw: a bug, but the broker must keep serving everyone else.
      spdlog::error("mitogen: broker handler raised: {}", e.what());
    }
  }
}

bool broker::defer(std::function<void()> fn) {
  if (stopped_.load()) return false;
  boost::asio::post(*io_, std::move(fn));
  return true;
}

bool broker::defer_sync(const std::function<void()>& fn) {
  if (on_broker_thread()) {
    fn();
    return true;
  }
  std::mutex mu;
  std::condition_variable cv;
  bool done = false, ran = false;
  auto state = std::make_shared<std::function<void()>>([&] {
    fn();
    ran = true;
  });
  if (!defer([&, state] {
        (*state)();
        std::lock_guard lk(mu);
        done = true;
        cv.notify_one();
      }))
    return false;
  std::unique_lock lk(mu);
  // If the broker stops before running the handler, io_context destroys it unrun.
  while (!done) {
    if (cv.wait_for(lk, std::chrono::milliseconds(50), [&] { return done; })) break;
    if (stopped_.load()) return false;
  }
  return ran;
}

void broker::shutdown() {
  if (shutting_down_.exchange(true)) return;
  boost::asio::post(*io_, [this] { begin_shutdown(); });
}

void broker::begin_shutdown() {
  std::vector<shutdown_hook> hooks;
  {
    std::lock_guard lk(hooks_mu_);
    for (auto& [id, h] : hooks_) hooks.push_back(h);
  }
  hooks_pending_ = hooks.size() + 1;  // +1 for ourselves, released below
  grace_timer_.expires_after(shutdown_grace);
  grace_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    if (hooks_pending_ > 0) spdlog::warn("mitogen: broker shutdown grace period expired");
    hooks_pending_ = 0;
    work_.reset();
    io_->stop();
  });
  for (auto& h : hooks) {
    try {
      h([this] { hook_done(); });
    } catch (const std::exception& e) {
      spdlog::error("mitogen: shutdown hook raised: {}", e.what());
      hook_done();
    }
  }
  hook_done();
}

void broker::hook_done() {
  if (hooks_pending_ == 0 || --hooks_pending_ > 0) return;
  grace_timer_.cancel();
  work_.reset();
  // Let already-queued handlers (final writes, dead messages) run, then stop.
  boost::asio::post(*io_, [this] { io_->stop(); });
}

void broker::join() {
  if (on_broker_thread()) return;
  std::lock_guard lk(join_mu_);
  if (thread_.joinable()) thread_.join();
}

// ------------------------------------------------------------ parking

void broker::park(std::weak_ptr<parkable> p) {
  std::lock_guard lk(park_mu_);
  if (parked_.empty()) arm_park_timer();
  parked_.push_back(std::move(p));
}

void broker::arm_park_timer() {
  const std::int64_t us = std::max<std::int64_t>(1, park_limit_us_.load());  // 0 would disarm it
  itimerspec t{};
  t.it_value.tv_sec = us / 1000000;
  t.it_value.tv_nsec = (us % 1000000) * 1000;
  ::timerfd_settime(park_timer_fd_, 0, &t, nullptr);
}

void broker::wait_park_timer() {
  park_timer_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                         [this](const boost::system::error_code& ec) {
                           if (ec) return;  // aborted: the broker is going away
                           std::uint64_t expirations;
                           (void)!::read(park_timer_fd_, &expirations, sizeof expirations);
                           unpark_listed();
                           wait_park_timer();
                         });
}

void broker::unpark_listed() {
  std::vector<std::weak_ptr<parkable>> listed, led;
  {
    std::lock_guard lk(park_mu_);
    listed.swap(parked_);
  }
  // Without park_mu_: unpark() takes the stream's lock, under which park() is called.
  for (auto& w : listed)
    if (auto p = w.lock(); p && p->unpark()) led.push_back(std::move(w));
  if (led.empty()) return;
  bool followed_now;
  {
    std::lock_guard lk(park_mu_);
    if (parked_.empty()) arm_park_timer();
    parked_.insert(parked_.end(), led.begin(), led.end());
    followed_now = followed();
  }
  // A follower that started while these were out of the list did not see them, and
  // their leaders may have parked them since: its count is visible now.
  if (followed_now)
    for (auto& w : led)
      if (auto p = w.lock()) p->unpark();
}

broker::follower::follower(const std::shared_ptr<broker>& b) : b_(b) {
  if (!b) return;
  // Counted first, then the list read: a stream stepping down lists itself first,
  // then reads the count (stream::step_down), so one of the two sees the other
  // (unpark_listed() covers the moment its list is out for checking).
  b->followers_.fetch_add(1);
  bool any;
  {
    std::lock_guard lk(b->park_mu_);
    any = !b->parked_.empty();
  }
  if (any) b->unpark_listed();
}

broker::follower::~follower() {
  if (auto b = b_.lock()) b->followers_.fetch_sub(1);
}

std::uint64_t broker::add_shutdown_hook(shutdown_hook hook) {
  std::lock_guard lk(hooks_mu_);
  auto id = next_hook_id_++;
  hooks_.emplace_back(id, std::move(hook));
  return id;
}

void broker::remove_shutdown_hook(std::uint64_t id) {
  std::lock_guard lk(hooks_mu_);
  std::erase_if(hooks_, [id](auto& p) { return p.first == id; });
}

}  // namespace mitogen
