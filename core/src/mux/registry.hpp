#pragma once
// Private to the daemon: the contexts it owns, keyed by connection stack, and the
// threads that start them.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "mitogen/context/connection_stack.hpp"
#include "mitogen/context/context.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen::mux::detail {

/// Threads for blocking jobs (connection attempts: local()/ssh()/sudo() block until
/// the bootstrap ends). Started on demand, up to `max_threads`, then kept until
/// stop(). Thread-safe.
class work_pool {
 public:
  explicit work_pool(std::size_t max_threads) : max_(max_threads) {}
  ~work_pool() { stop(); }
  work_pool(const work_pool&) = delete;
  work_pool& operator=(const work_pool&) = delete;
  /// Queue `job`; false (job dropped) once stopped.
  bool post(std::function<void()> job);
  /// Run what is queued, then join every thread. Idempotent; not from a pool thread.
  void stop();
  /// Threads alive now (for tests).
  std::size_t threads() const;

 private:
  void run();
  const std::size_t max_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  std::size_t idle_ = 0;
  std::size_t alive_ = 0;
  bool stopping_ = false;
};

/// The outcome of resolving a stack: its innermost context, or why not.
struct connect_result {
  std::optional<context> ctx;
  std::error_code ec;   ///< the failure's errc (empty: another kind of error)
  std::string message;  ///< what went wrong, for the client (never a password)
  bool ok() const noexcept { return ctx.has_value(); }
};

/// The contexts of the daemon, one per connection stack prefix, shared by every
/// client. Owned by shared_ptr (pool jobs and the router's watchers hold it).
/// Thread-safe; its callbacks run on the broker thread (warm stacks) or a pool
/// thread (new connections), never with its lock held.
class registry : public std::enable_shared_from_this<registry> {
 public:
  using clock = std::chrono::steady_clock;
  using done_fn = std::function<void(connect_result)>;

  struct options {
    std::size_t max_contexts = 1000;
    std::size_t connect_threads = 16;
    /// Whether client `id` is still attached (a client that detached while its
    /// connect was under way must not be counted as a user of the context). Called
    /// with the registry's lock held: it must not call back into the registry.
    std::function<bool(std::uint32_t)> attached;
  };

  static std::shared_ptr<registry> create(std::shared_ptr<router> r, options opts);
  ~registry();

  /// Resolve `stack` for `client`: reuse each hop's context if it exists, wait for
  /// an attempt already under way for it, or start one on the pool. `done` is called
  /// exactly once: inline when every hop is warm, else from a pool thread.
  void connect(connection_stack stack, std::uint32_t client, done_fn done);
  /// Shut down the context of `stack` and every context started through it; the next
  /// connect() makes new ones. Returns how many were shut down (or abandoned while
  /// connecting). Any thread except a pool thread waiting on it.
  std::size_t reset(const connection_stack& stack);
  /// `client` detached: its contexts are no longer in use by it.
  void client_gone(std::uint32_t client);
  /// Every context as a list of dicts (docs/ansible.md, `mitogen-mux status`).
  wire::list status() const;
  /// Contexts known (connected or connecting).
  std::size_t size() const;
  /// Stop starting contexts: queued attempts fail, running ones end with the router.
  /// Then joins the pool: call after the router began shutting down.
  void shutdown();

 private:
  struct entry {
    std::string key;          ///< stack_key() of the prefix this entry is
    std::string description;  ///< describe_stack() of it
    std::optional<context> ctx;  ///< set once connected
    std::vector<std::function<void(const connect_result&)>> waiters;  ///< while connecting
    clock::time_point created = clock::now();
    clock::time_point last_used = clock::now();
    std::uint64_t uses = 0;
    std::set<std::uint32_t> clients;  ///< attached clients that asked for it
    std::uint32_t watch = 0;          ///< handler that hears the context's death
    bool abandoned = false;           ///< reset or evicted while connecting
  };
  struct request {
    connection_stack stack;
    std::uint32_t client;
    done_fn done;
  };

  registry(std::shared_ptr<router> r, options opts)
      : router_(std::move(r)), opts_(std::move(opts)), pool_(opts_.connect_threads) {}
  void step(const std::shared_ptr<request>& rq, std::size_t i, std::optional<context> via);
  void run_connect(const std::shared_ptr<request>& rq, std::size_t i, const std::optional<context>& via,
                   const std::shared_ptr<entry>& e);
  /// The context `id` disconnected (broker thread).
  void on_gone(std::uint32_t id);
  void touch_locked(entry& e, std::uint32_t client);
  /// Remove `key` and every entry started through it; their contexts are returned
  /// (deepest first) to be shut down once the lock is released.
  std::vector<context> remove_subtree_locked(const std::string& key, std::size_t* count = nullptr);
  /// Evict least recently used idle contexts while over max_contexts. `keep` (and
  /// its ancestors) is never evicted.
  std::vector<context> enforce_limit_locked(const std::string& keep);
  bool in_use_locked(const std::string& key) const;
  void shut_down(const std::vector<context>& doomed);

  std::shared_ptr<router> router_;
  options opts_;
  work_pool pool_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<entry>> entries_;  // ordered: a key's subtree follows it
  std::unordered_map<std::uint32_t, std::string> by_id_;
  std::unordered_map<std::uint32_t, std::set<std::string>> client_keys_;
  bool shut_ = false;
  bool warned_full_ = false;
};

}  // namespace mitogen::mux::detail
