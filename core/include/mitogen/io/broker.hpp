#pragma once
/// Broker: one private thread running a Boost.Asio io_context. All stream I/O and
/// all handler callbacks happen on it.
#include <utility>  // Boost 1.74 Asio needs it before its own headers under C++20

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>

namespace mitogen {

/// Owns the I/O thread. Create with std::make_shared; any thread may call any
/// public method. Destroying the last reference shuts it down and joins the thread
/// (unless destroyed on its own thread: then the loop stops without running what is
/// still queued, and the thread exits on its own). The first broker sets
/// SIGPIPE to SIG_IGN if it was SIG_DFL, so a dead child's pipe gives EPIPE.
class broker : public std::enable_shared_from_this<broker> {
 public:
  broker();
  ~broker();
  broker(const broker&) = delete;
  broker& operator=(const broker&) = delete;

  /// The io_context the broker thread runs. Post to it only via defer().
  boost::asio::io_context& io() noexcept { return *io_; }

  /// Run `fn` on the broker thread, soon. Returns false (and drops `fn`) once the
  /// broker has stopped.
  bool defer(std::function<void()> fn);

  /// Run `fn` on the broker thread and wait for it. Runs inline when already on it.
  /// Returns false if the broker stopped before `fn` could run.
  bool defer_sync(const std::function<void()>& fn);

  /// Begin an orderly shutdown: every registered shutdown hook runs on the broker
  /// thread (routers close their streams and release every waiting caller), then the
  /// thread stops once the hooks' grace period ends. Idempotent, safe from any thread,
  /// from handlers and from destructors; never blocks.
  void shutdown();

  /// Wait for the broker thread to finish. No-op on the broker thread itself.
  void join();

  /// True once shutdown() has been called.
  bool shutting_down() const noexcept { return shutting_down_.load(); }
  /// True when called from the broker thread.
  bool on_broker_thread() const noexcept { return std::this_thread::get_id() == thread_id_.load(); }

  /// A hook run on the broker thread when shutdown starts. The hook receives a
  /// `done` callback it must call (from the broker thread) when its cleanup is
  /// finished; the thread exits after every hook called `done`, or after the
  /// grace period, whichever is first. Returns an id for remove_shutdown_hook().
  using shutdown_hook = std::function<void(std::function<void()> done)>;
  std::uint64_t add_shutdown_hook(shutdown_hook hook);
  void remove_shutdown_hook(std::uint64_t id);

  /// Upper bound on how long shutdown hooks may take before the thread stops anyway.
  static constexpr std::chrono::milliseconds shutdown_grace{3000};

  // ---------------------------------------------------------------- parking
  // A caller that read its reply itself (stream::lead()) leaves the stream out of the
  // broker's sight when it steps down ("parked"): the next call on it then costs no
  // epoll_ctl() to take it out again, and none to give it back. The broker takes every
  // parked stream back within the park limit, and at once when a thread starts waiting
  // for something only the broker would read for it (docs/architecture.md, "Parking").

  /// Something the broker gives back its input watch to (a stream).
  class parkable {
   public:
    /// Watch input again, unless a thread leads (reads) now: then true, to be asked
    /// again later. Any thread.
    virtual bool unpark() = 0;

   protected:
    ~parkable() = default;
  };
  /// List `p` to be unparked within the park limit. Any thread; the caller lists each
  /// parkable once until its unpark() returns false.
  void park(std::weak_ptr<parkable> p);
  /// How long input may wait, at most, on a parked stream nobody waits on (a log
  /// record, output, a request from the child while no caller waits).
  static constexpr std::chrono::microseconds default_park_limit{1000};
  /// Change it (any thread; from the next park on). Zero: streams never park (a
  /// process whose broker forwards most of what it reads, the multiplexer daemon).
  /// Tests set it long, so that what would arrive only through the limit hangs.
  void set_park_limit(std::chrono::microseconds limit) noexcept { park_limit_us_.store(limit.count()); }
  /// False once the park limit is zero.
  bool parking() const noexcept { return park_limit_us_.load(std::memory_order_relaxed) > 0; }

  /// While one is alive, a thread waits for what the broker must read and deliver
  /// (a receiver's follower, a select): parked streams are unparked now, and no
  /// stream parks. Any thread.
  class follower {
   public:
    explicit follower(const std::shared_ptr<broker>& b);
    ~follower();
    follower(const follower&) = delete;
    follower& operator=(const follower&) = delete;

   private:
    std::weak_ptr<broker> b_;
  };
  /// True while a follower is alive: a stream stepping down must not park.
  bool followed() const noexcept { return followers_.load() > 0; }

 private:
  static void run(boost::asio::io_context& io);
  void begin_shutdown();  // broker thread
  void hook_done();       // broker thread

  /// Shared with the thread: when the last reference dies inside a handler, the
  /// io_context must outlive this object until run() unwinds.
  std::shared_ptr<boost::asio::io_context> io_ = std::make_shared<boost::asio::io_context>();
  /// Set (on the broker thread) by a destructor running there: the thread must not
  /// touch `this` once run() returns.
  std::shared_ptr<bool> orphaned_ = std::make_shared<bool>(false);
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread thread_;
  /// Cleared when the thread ends: thread ids are reused, and an unrelated thread
  /// must never look like the broker's.
  std::atomic<std::thread::id> thread_id_{};
  std::atomic<bool> shutting_down_{false};
  std::atomic<bool> stopped_{false};

  std::mutex hooks_mu_;
  std::vector<std::pair<std::uint64_t, shutdown_hook>> hooks_;
  std::uint64_t next_hook_id_ = 1;
  std::size_t hooks_pending_ = 0;      // broker thread only
  boost::asio::steady_timer grace_timer_{*io_};

  std::mutex join_mu_;

  /// Unpark what is listed; list again what is led now, and arm the timer for it.
  void unpark_listed();
  void wait_park_timer();  // broker thread
  void arm_park_timer();   // park_mu_ held
  std::mutex park_mu_;
  std::vector<std::weak_ptr<parkable>> parked_;  ///< guarded by park_mu_
  std::atomic<int> followers_{0};
  std::atomic<std::int64_t> park_limit_us_{default_park_limit.count()};
  int park_timer_fd_ = -1;  ///< a timerfd; owned by park_timer_
  boost::asio::posix::stream_descriptor park_timer_{*io_};
};

}  // namespace mitogen
