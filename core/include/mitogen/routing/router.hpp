#pragma once
/// Router: context ids -> streams, handles -> handlers. Delivers inbound messages to
/// handlers on the broker thread, forwards the rest, and turns every failure to
/// deliver into a dead message so no caller waits forever.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mitogen/io/broker.hpp"
#include "mitogen/io/stream.hpp"
#include "mitogen/routing/receiver.hpp"
#include "mitogen/wire/message.hpp"

namespace mitogen {

namespace detail {
class route_table;
class log_forwarder;
}  // namespace detail

/// Options of add_handler().
struct handler_options {
  /// Handle to register; 0 allocates a fresh one (>= 1000).
  std::uint32_t handle = 0;
  /// Keep the handler after its first message.
  bool persist = true;
  /// If set, only messages from this context are accepted, and the handler gets a dead
  /// message when this context disconnects.
  std::optional<std::uint32_t> respondent;
  /// If set, called (broker thread, with the router's handler lock held: it must be
  /// quick and must not call the router) for each message from another context;
  /// false drops it (logged once per sender; a dead reply if it asked for one).
  std::function<bool(const wire::message&)> policy;
  /// Replace a handler already registered on `handle`; if false, add_handler throws
  /// mitogen::error instead.
  bool overwrite = true;
};

/// How add_route() treats a stream.
struct route_options {
  /// A client rather than a child: a process of this program's own user that attached
  /// to it (the Ansible multiplexer's workers, checked with SO_PEERCRED by whoever
  /// accepted it). Its messages act with this router's authority: their auth_id is
  /// rewritten to context_id(), so contexts obey them as they obey this program. In
  /// unidirectional mode, messages between a trusted stream and any other are
  /// forwarded; a trusted stream is told (DEL_ROUTE) when any context disconnects.
  bool trusted = false;
};

/// Where forwarded log records go. Called on the broker thread.
using log_sink = std::function<void(std::uint32_t context_id, const std::string& context_name,
                                    const std::string& logger, int level, const std::string& text)>;

/// Created with router::create(); owned by shared_ptr. Thread-safe unless noted.
class router : public std::enable_shared_from_this<router> {
 public:
  /// Called on the broker thread with each message for its handle.
  using handler_fn = std::function<void(wire::message&&)>;

  static std::shared_ptr<router> create(std::shared_ptr<broker> b);
  /// A router for a client of another program's router (an Ansible worker attached
  /// to the mitogen-mux daemon): `my_id` is the id that router gave us, and every
  /// context not routed here is reached through `parent`, the stream to context
  /// `parent_id`. The parent is trusted: its messages may carry any src_id/auth_id
  /// but ours (it verifies its own children). DEL_ROUTE from it releases the callers
  /// waiting on that context; when it closes, every caller waiting on any context is
  /// released. Shutting the router down closes the parent stream (no SHUTDOWN is
  /// sent to it). `parent` must not be started yet; create_client starts it.
  static std::shared_ptr<router> create_client(std::shared_ptr<broker> b, std::uint32_t my_id,
                                               std::uint32_t parent_id, std::shared_ptr<stream> parent,
                                               std::string parent_name);
  /// The parent's context id in client mode (create_client), else nullopt.
  std::optional<std::uint32_t> parent_id() const noexcept {
    return parent_ ? std::optional<std::uint32_t>(parent_id_) : std::nullopt;
  }
  ~router();

  const std::shared_ptr<broker>& get_broker() const noexcept { return broker_; }
  /// This router's own context id (0: the master).
  std::uint32_t context_id() const noexcept { return my_id_; }

  /// Register a handler; returns its handle. Any thread.
  std::uint32_t add_handler(handler_fn fn, handler_options opts = {});
  /// Remove a handler (no dead message is sent to it). Any thread.
  void del_handler(std::uint32_t handle);
  /// A receiver registered on a fresh handle.
  std::shared_ptr<receiver> make_receiver(std::optional<std::uint32_t> respondent, bool persist);
  /// A receiver registered with these options (handle 0: a fresh one).
  std::shared_ptr<receiver> make_receiver(handler_options opts);

  /// Send a message (src_id/auth_id are set to ours). Any thread. If it cannot be
  /// delivered and has a reply_to, a dead message is delivered to that handle.
  void route(wire::message m);

  /// A new context id for a child.
  std::uint32_t allocate_id() { return next_id_.fetch_add(1); }
  /// A new context id for a child that context `via_id` will start (via=): recorded
  /// as owned by the subtree of the direct child `via_id` is routed through, so that
  /// only that stream may ADD_ROUTE it. Throws channel_error if `via_id` is not
  /// connected.
  std::uint32_t allocate_id_via(std::uint32_t via_id);

  /// Ids per ALLOCATE_ID block (upstream's IdAllocator.BLOCK_SIZE).
  static constexpr std::uint32_t id_block_size = 1000;
  /// ALLOCATE_ID blocks one direct child's subtree may hold; further requests get a
  /// dead reply (bounds what a hostile child can make us remember).
  static constexpr std::size_t max_blocks_per_child = 64;

  /// Attach a started stream to context `id`. Messages from it must carry src_id and
  /// auth_id equal to `id` or to a context routed through it (source verification);
  /// anything else is dropped and logged once. Messages for other contexts are
  /// forwarded. The child may add routes for ids allocated to its subtree (ADD_ROUTE,
  /// see docs/via.md). When it closes, every handler whose respondent is `id` or a
  /// context routed through it gets a dead message and the teardown registered for
  /// `id` runs (broker thread). The stream keeps the router alive until then.
  void add_route(std::uint32_t id, std::string name, std::shared_ptr<stream> s, route_options opts = {});

  /// Upstream's Router.unidirectional. Off (the default): a child may message any
  /// context it can name, with its true src_id and auth_id, and the receiving agent
  /// refuses whatever needs authority it does not have (docs/security.md). On: a
  /// message from one child's subtree to another's is forwarded only if one of the two
  /// streams is trusted (route_options::trusted) or allow_forward() granted it;
  /// anything else is refused (a dead reply if it asked for one, logged once per
  /// sender). Any thread; takes effect for the next message.
  void set_unidirectional(bool on) noexcept { unidirectional_.store(on); }
  bool unidirectional() const noexcept { return unidirectional_.load(); }

  /// Let context `from` send to handle `handle` of context `to` even in
  /// unidirectional mode: the program handed `from` a Sender of `to`'s on purpose
  /// (the Python API calls this for every such Sender it passes on). Forgotten when
  /// either context disconnects. Any thread.
  void allow_forward(std::uint32_t from, std::uint32_t to, std::uint32_t handle);
  /// The stream of context `id`, if connected (for a descendant started via= another
  /// context: the stream of the direct child it is reached through).
  std::shared_ptr<stream> stream_for(std::uint32_t id) const;
  /// For a routed context: the direct child whose stream leads to it (itself for a
  /// direct child); 0 if `id` is not routed.
  std::uint32_t routed_via(std::uint32_t id) const;
  /// Every context routed through direct child `id`'s stream, `id` excluded.
  std::vector<std::uint32_t> descendants_of(std::uint32_t id) const;
  /// Name of context `id` ("" if unknown).
  std::string name_of(std::uint32_t id) const;

  /// Disconnect context `id`'s stream (e.g. it broke the codec rules). Any thread.
  void disconnect(std::uint32_t id, std::error_code why, const std::string& detail);
  /// Block until context `id` is disconnected or `timeout` passes. Returns true if gone.
  bool wait_disconnected(std::uint32_t id, std::chrono::milliseconds timeout);

  /// Run `fn(done)` on the broker thread after a context's stream closed; the router's
  /// shutdown waits for `done` (used to reap child processes).
  void add_teardown(std::uint32_t id, std::function<void(std::function<void()> done)> fn);

  /// Leader/follower (docs/architecture.md, "A caller reads its reply"): if `rx`
  /// waits for one reply from one context over a stream that allows it, read that
  /// stream on this thread until `rx` has something, delivering the reply here and
  /// handing every other frame to the broker. Called by receiver; busy = wait as
  /// usual.
  /// `begun`: what begin_lead_for() returned for `rx` on this thread: it goes on
  /// from there, with that plan (a reply that comes another way after all, the route
  /// having changed, reaches `rx` through the broker, which wakes this thread).
  stream::lead_status lead_for(receiver& rx, std::optional<std::chrono::steady_clock::time_point> deadline,
                               int wake_fd, std::optional<lead_plan> begun = std::nullopt);
  /// lead_for()'s first step, taken before the request goes out (stream::begin_lead):
  /// the plan, its stream now out of the broker's sight; nullopt if this thread
  /// cannot lead.
  std::optional<lead_plan> begin_lead_for(const receiver& rx, int wake_fd);

  /// Route FORWARD_LOG records here (default: spdlog logger "mitogen.ctx").
  void set_log_sink(log_sink sink);
  /// Forwarded log records a child may send per second, and in one burst; the excess
  /// is dropped (and counted in the log when the child disconnects).
  static constexpr double log_rate = 2000.0;
  static constexpr double log_burst = 10000.0;

  /// How long shutdown() lets children flush and exit before hanging up on them.
  static constexpr std::chrono::milliseconds shutdown_grace{500};

  /// Ask every child to shut down, close all streams, release every waiting caller.
  /// Idempotent; any thread; does not block (broker shutdown calls it too).
  void shutdown();
  bool is_shut_down() const noexcept { return shut_down_.load(); }

 private:
  struct handler_entry {
    handler_fn fn;
    bool persist;
    std::optional<std::uint32_t> respondent;
    std::function<bool(const wire::message&)> policy;
  };
  /// What a child has done wrong, so each kind of misbehaviour is logged once.
  enum complaint : unsigned {
    spoofed = 1,
    foreign_handle = 2,
    misrouted = 4,
    bad_route = 8,
    bad_alloc = 16,
    refused_by_policy = 32,
    unidirectional_refusal = 64
  };
  /// True the first time `what` is reported for `id` (broker thread).
  bool first_complaint(std::uint32_t id, unsigned what);

  explicit router(std::shared_ptr<broker> b);
  // Inbound (broker thread). `from_id` is the direct context the message came from.
  void on_stream_message(std::uint32_t from_id, bool trusted, wire::message&& m);
  void on_parent_message(wire::message&& m);  // client mode: from the parent's stream
  void on_stream_gone(std::uint32_t id, std::error_code ec, const std::string& detail);
  void deliver_local(wire::message&& m);
  /// The reply a leader read (lead_for): delivered here if its handler is a plain
  /// one-shot handler reserved for its sender; false leaves it to the broker.
  bool deliver_reply_here(wire::message& m);
  /// Where a leader for a receiver would read. nullopt: `rx` is not a one-reply
  /// receiver this thread may read for.
  std::optional<lead_plan> plan_lead(const receiver& rx);
  /// Remove the one-shot handler `it` points at and return its function
  /// (handlers_mu_ held).
  handler_fn take_handler_locked(std::unordered_map<std::uint32_t, handler_entry>::iterator it);
  void forward(std::uint32_t from_id, bool trusted, wire::message&& m);
  // via= routing: ADD_ROUTE/DEL_ROUTE/ALLOCATE_ID from direct child `from_id`.
  void on_add_route(std::uint32_t from_id, const wire::message& m);
  void on_del_route(std::uint32_t from_id, const wire::message& m);
  void on_allocate_id(std::uint32_t from_id, const wire::message& m);

  /// Deliver a dead message to our own handle `handle` (any thread).
  void deliver_dead(std::uint32_t handle, std::string reason);
  /// Answer `m` (if it asked for a reply and is not dead itself) with a dead message
  /// carrying `reason`, sent on the stream of `via_id` (the direct context it came
  /// from). Every refusal of the router goes through here.
  void refuse(std::uint32_t via_id, const wire::message& m, const std::string& reason);
  /// Dead messages, now, for every handler whose respondent is `id`.
  void fail_waiters(std::uint32_t id, const std::string& reason);
  /// Contexts `gone` disconnected: release their waiters, tell trusted clients
  /// (DEL_ROUTE), let the log forwarder report, mark them gone (broker thread).
  void contexts_gone(const std::vector<std::pair<std::uint32_t, std::string>>& gone, const std::string& why);
  /// If shutdown() is waiting and no stream or teardown is left, finish it.
  void finish_shutdown_if_idle();
  void shutdown_on_broker(std::function<void()> done);

  std::shared_ptr<broker> broker_;
  std::uint32_t my_id_ = 0;
  std::shared_ptr<stream> parent_;  ///< client mode: the stream to everything not routed here
  std::uint32_t parent_id_ = 0;
  std::atomic<std::uint32_t> next_id_{1};
  std::atomic<std::uint32_t> next_handle_{wire::first_dynamic_handle};
  std::atomic<bool> shut_down_{false};      ///< no new work: set by shutdown() at once
  std::atomic<bool> shutdown_begun_{false};  ///< shutdown_on_broker() ran (broker thread)
  std::atomic<bool> unidirectional_{false};
  std::uint64_t hook_id_ = 0;

  mutable std::mutex handlers_mu_;
  std::unordered_map<std::uint32_t, handler_entry> handlers_;
  std::unordered_map<std::uint32_t, std::unordered_set<std::uint32_t>> by_respondent_;

  std::unique_ptr<detail::route_table> table_;    ///< thread-safe on its own
  std::unique_ptr<detail::log_forwarder> logs_;  ///< broker thread, but set_sink
  std::unordered_map<std::uint32_t, unsigned> complaints_;  // broker thread only

  std::mutex gone_mu_;
  std::condition_variable gone_cv_;
  std::unordered_set<std::uint32_t> gone_;
  // Guarded by gone_mu_.
  std::unordered_map<std::uint32_t, std::function<void(std::function<void()>)>> teardowns_;
  std::size_t teardowns_running_ = 0;
  std::function<void()> shutdown_done_;
};

}  // namespace mitogen
