#include "mitogen/routing/router.hpp"

#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

#include "log_forwarder.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/pickle.hpp"
#include "route_table.hpp"

// The router's units: this file (handlers, inbound dispatch, forwarding policy,
// disconnects, shutdown), route_table.cpp (which stream reaches which context, id
// ownership, forwarding grants), log_forwarder.cpp (FORWARD_LOG with its rate
// limit) and receiver.cpp (the queues callers wait on).

namespace mitogen {
namespace {

/// Bytes queued towards a context above which messages forwarded to it from other
/// children are refused (docs/via.md).
constexpr std::size_t max_forward_backlog = 64u << 20;

/// "123" or "123:name" (ADD_ROUTE/DEL_ROUTE payloads) -> id, name. False if malformed.
bool parse_route(const std::string& data, std::uint32_t& id, std::string& name) {
  auto colon = data.find(':');
  std::string digits = data.substr(0, colon);
  if (digits.empty() || digits.size() > 10) return false;
  std::uint64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<unsigned>(c - '0');
  }
  if (v > 0xffffffffu) return false;
  id = static_cast<std::uint32_t>(v);
  name.clear();
  if (colon != std::string::npos) {
    name = data.substr(colon + 1, 256);
    for (char& c : name)
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------- creation

std::shared_ptr<router> router::create(std::shared_ptr<broker> b) {
  auto r = std::shared_ptr<router>(new router(std::move(b)));
  std::weak_ptr<router> weak = r;
  r->hook_id_ = r->broker_->add_shutdown_hook([weak](std::function<void()> done) {
    if (auto self = weak.lock())
      self->shutdown_on_broker(std::move(done));
    else
      done();
  });
  r->add_handler([weak](wire::message&& m) {
                   if (m.is_dead()) return;
                   if (auto self = weak.lock()) self->logs_->on_record(m.src_id, m.data);
                 },
                 {.handle = wire::FORWARD_LOG, .persist = true, .respondent = std::nullopt});
  return r;
}

std::shared_ptr<router> router::create_client(std::shared_ptr<broker> b, std::uint32_t my_id,
                                              std::uint32_t parent_id, std::shared_ptr<stream> parent,
                                              std::string parent_name) {
  auto r = create(std::move(b));
  r->my_id_ = my_id;
  r->parent_id_ = parent_id;
  r->parent_ = parent;
  r->add_route(parent_id, std::move(parent_name), parent);
  parent->start();
  return r;
}

router::router(std::shared_ptr<broker> b)
    : broker_(std::move(b)),
      table_(std::make_unique<detail::route_table>()),
      logs_(std::make_unique<detail::log_forwarder>([this](std::uint32_t id) { return name_of(id); })) {}

// Streams hold the router until they close, so by now no child is connected.
router::~router() { broker_->remove_shutdown_hook(hook_id_); }

// ---------------------------------------------------------------- handlers

std::uint32_t router::add_handler(handler_fn fn, handler_options opts) {
  std::lock_guard lk(handlers_mu_);
  std::uint32_t h = opts.handle ? opts.handle : next_handle_.fetch_add(1);
  if (!opts.overwrite && handlers_.count(h))
    throw error("mitogen: handle " + std::to_string(h) + " already has a handler");
  if (auto old = handlers_.find(h); old != handlers_.end() && old->second.respondent) {
    auto rit = by_respondent_.find(*old->second.respondent);
    if (rit != by_respondent_.end()) rit->second.erase(h);
  }
  handlers_[h] = handler_entry{std::move(fn), opts.persist, opts.respondent, std::move(opts.policy)};
  if (opts.respondent) by_respondent_[*opts.respondent].insert(h);
  return h;
}

void router::del_handler(std::uint32_t handle) {
  std::lock_guard lk(handlers_mu_);
  auto it = handlers_.find(handle);
  if (it == handlers_.end()) return;
  if (it->second.respondent) {
    auto rit = by_respondent_.find(*it->second.respondent);
    if (rit != by_respondent_.end()) {
      rit->second.erase(handle);
      if (rit->second.empty()) by_respondent_.erase(rit);
    }
  }
  handlers_.erase(it);
}

std::shared_ptr<receiver> router::make_receiver(std::optional<std::uint32_t> respondent, bool persist) {
  return make_receiver(handler_options{.handle = 0, .persist = persist, .respondent = respondent});
}

std::shared_ptr<receiver> router::make_receiver(handler_options opts) {
  // An explicit handle is checked (and taken) by add_handler; a fresh one is ours.
  std::uint32_t h = opts.handle ? opts.handle : next_handle_.fetch_add(1);
  opts.handle = h;
  auto rx = std::shared_ptr<receiver>(new receiver(weak_from_this(), h));
  std::weak_ptr<receiver> weak = rx;
  try {
    add_handler([weak](wire::message&& m) {
                  if (auto r = weak.lock()) r->push(std::move(m));
                },
                std::move(opts));
  } catch (...) {
    rx->router_.reset();  // the handle belongs to someone else: do not remove it
    throw;
  }
  // A receiver made after shutdown must not wait forever.
  if (shut_down_.load()) deliver_dead(h, "router shut down");
  return rx;
}

void router::set_log_sink(log_sink sink) { logs_->set_sink(std::move(sink)); }

// ---------------------------------------------------------------- outbound

void router::route(wire::message m) {
  m.src_id = my_id_;
  m.auth_id = my_id_;
  if (m.dst_id == my_id_) {
    if (!broker_->defer([self = shared_from_this(), m = std::move(m)]() mutable { self->deliver_local(std::move(m)); }))
      spdlog::debug("mitogen: dropping local message after broker stopped");
    return;
  }
  std::shared_ptr<stream> s;
  if (!shut_down_.load()) s = stream_for(m.dst_id);
  const auto dst = m.dst_id;
  const auto reply_to = m.is_dead() ? 0 : m.reply_to;
  if (s && s->send(std::move(m))) return;
  if (reply_to) {
    deliver_dead(reply_to, shut_down_.load() ? "router shut down" : "no route to context " + std::to_string(dst));
  }
}

void router::deliver_dead(std::uint32_t handle, std::string reason) {
  auto dead = wire::message::dead(my_id_, handle, std::move(reason));
  dead.src_id = my_id_;
  auto self = shared_from_this();
  if (broker_->defer([self, dead]() mutable { self->deliver_local(std::move(dead)); })) return;
  // The broker is gone: run the handler here so its waiter is released.
  handler_fn fn;
  {
    std::lock_guard lk(handlers_mu_);
    auto it = handlers_.find(handle);
    if (it == handlers_.end()) return;
    fn = it->second.fn;
  }
  del_handler(handle);
  fn(std::move(dead));
}

void router::refuse(std::uint32_t via_id, const wire::message& m, const std::string& reason) {
  if (!m.reply_to || m.is_dead()) return;
  auto dead = wire::message::dead(m.src_id, m.reply_to, reason);
  dead.src_id = dead.auth_id = my_id_;
  if (auto s = stream_for(via_id)) s->send(std::move(dead));
}

// ---------------------------------------------------------------- inbound

void router::deliver_local(wire::message&& m) {
  handler_fn fn;
  {
    std::lock_guard lk(handlers_mu_);
    auto it = handlers_.find(m.handle);
    if (it == handlers_.end()) {
      if (!m.is_dead()) spdlog::debug("mitogen: no handler for handle {} (from {})", m.handle, m.src_id);
      // Tell the sender nobody is listening, so its caller does not wait forever.
      if (m.src_id != my_id_) refuse(m.src_id, m, "no such handle in context " + std::to_string(my_id_));
      return;
    }
    auto& e = it->second;
    if (e.respondent && *e.respondent != m.src_id && m.src_id != my_id_) {
      if (first_complaint(m.src_id, foreign_handle))
        spdlog::warn("mitogen: context {} sent to handle {} reserved for context {}; dropped (logged once)",
                     m.src_id, m.handle, *e.respondent);
      return;
    }
    if (e.policy && m.src_id != my_id_ && !e.policy(m)) {
      if (first_complaint(m.src_id, refused_by_policy))
        spdlog::warn("mitogen: context {} may not send to handle {}; dropped (logged once)", m.src_id, m.handle);
      refuse(m.src_id, m, "refused by the policy of handle " + std::to_string(m.handle));
      return;
    }
    fn = e.persist && !m.is_dead() ? e.fn : take_handler_locked(it);
  }
  fn(std::move(m));
}

router::handler_fn router::take_handler_locked(std::unordered_map<std::uint32_t, handler_entry>::iterator it) {
  auto fn = std::move(it->second.fn);
  if (auto& resp = it->second.respondent) {
    auto rit = by_respondent_.find(*resp);
    if (rit != by_respondent_.end()) {
      rit->second.erase(it->first);
      if (rit->second.empty()) by_respondent_.erase(rit);
    }
  }
  handlers_.erase(it);
  return fn;
}

bool router::deliver_reply_here(wire::message& m) {
  handler_fn fn;
  {
    std::lock_guard lk(handlers_mu_);
    auto it = handlers_.find(m.handle);
    if (it == handlers_.end()) return false;
    auto& e = it->second;
    // Anything the broker would complain about, or run a policy on, goes there.
    if (e.persist || e.policy || !e.respondent || *e.respondent != m.src_id) return false;
    fn = take_handler_locked(it);
  }
  fn(std::move(m));
  return true;
}

std::optional<lead_plan> router::plan_lead(const receiver& rx) {
  lead_plan p;
  {
    std::lock_guard lk(handlers_mu_);
    auto it = handlers_.find(rx.handle());
    if (it == handlers_.end() || it->second.persist || it->second.policy || !it->second.respondent)
      return std::nullopt;
    p.want = *it->second.respondent;
  }
  if (p.want == my_id_ || shut_down_.load()) return std::nullopt;
  if (auto r = table_->route_of(p.want)) {
    if (r->trusted) return std::nullopt;  // a client's frames get our authority: the broker's path
    p.s = r->s;
    p.from = r->via;
  } else if (parent_ && table_->contains(parent_id_)) {
    p.s = parent_;
    p.from = parent_id_;
  }
  if (!p.s) return std::nullopt;
  p.via_parent = parent_ && p.from == parent_id_;
  return p;
}

std::optional<lead_plan> router::begin_lead_for(const receiver& rx, int wake_fd) {
  auto p = plan_lead(rx);
  if (!p || !p->s->begin_lead(wake_fd)) return std::nullopt;
  return p;
}

stream::lead_status router::lead_for(receiver& rx, std::optional<std::chrono::steady_clock::time_point> deadline,
                                     int wake_fd, std::optional<lead_plan> begun) {
  const bool was_begun = begun.has_value();
  auto p = was_begun ? std::move(begun) : plan_lead(rx);
  if (!p) return stream::lead_status::busy;
  const std::uint32_t handle = rx.handle();
  // The checks on_stream_message()/on_parent_message() make, for the one frame we
  // take; every other frame goes to the broker, which makes them all.
  auto take = [&](wire::message& m) {
    if (m.dst_id != my_id_ || m.handle != handle || m.src_id != p->want) return false;
    if (p->via_parent) {
      if (m.auth_id == my_id_) return false;
    } else if (!table_->speaks_for(p->from, m.src_id) || !table_->speaks_for(p->from, m.auth_id)) {
      return false;
    }
    return deliver_reply_here(m);
  };
  return p->s->lead(take, [&] { return rx.ready(); }, deadline, wake_fd, was_begun);
}

void router::on_parent_message(wire::message&& m) {
  if (m.dst_id != my_id_ || m.src_id == my_id_ || m.auth_id == my_id_) {
    if (first_complaint(parent_id_, misrouted))
      spdlog::warn("mitogen: the parent sent a message for context {} from {}; a client routes nothing, dropped "
                   "(logged once)",
                   m.dst_id, m.src_id);
    return;
  }
  if (m.handle == wire::DEL_ROUTE && m.src_id == parent_id_ && !m.is_dead()) {
    std::uint32_t id = 0;
    std::string name;
    if (parse_route(m.data, id, name) && id != parent_id_ && id != my_id_)
      contexts_gone({{id, name}}, "reported by context " + std::to_string(parent_id_));
    return;
  }
  deliver_local(std::move(m));
}

void router::on_stream_message(std::uint32_t from_id, bool trusted, wire::message&& m) {
  if (parent_ && from_id == parent_id_) return on_parent_message(std::move(m));
  // Source verification: a child speaks for itself and for the contexts routed
  // through it (via=), never for anybody else.
  if (!table_->speaks_for(from_id, m.src_id) || !table_->speaks_for(from_id, m.auth_id)) {
    if (first_complaint(from_id, spoofed))
      spdlog::warn("mitogen: context {} ({}) sent a message claiming src_id={} auth_id={}; dropped (logged once)",
                   from_id, name_of(from_id), m.src_id, m.auth_id);
    return;
  }
  // A trusted client acts with our authority (upstream's unix listener does the same).
  if (trusted) m.auth_id = my_id_;
  if (m.dst_id != my_id_) return forward(from_id, trusted, std::move(m));
  if (!m.is_dead()) {
    switch (m.handle) {
      case wire::ADD_ROUTE: return on_add_route(from_id, m);
      case wire::DEL_ROUTE: return on_del_route(from_id, m);
      case wire::ALLOCATE_ID: return on_allocate_id(from_id, m);
      default: break;
    }
  }
  deliver_local(std::move(m));
}

void router::forward(std::uint32_t from_id, bool trusted, wire::message&& m) {
  // For another context (a sibling, or a descendant of one): forward it as it is,
  // unless this router is unidirectional and nobody allowed that path.
  const auto dst = m.dst_id;
  if (!trusted && unidirectional_.load() && !table_->may_forward(m.src_id, dst, m.handle)) {
    if (first_complaint(from_id, unidirectional_refusal))
      spdlog::warn("mitogen: context {} ({}) sent to context {}, which this unidirectional router does not allow; "
                   "refused (logged once)",
                   m.src_id, name_of(from_id), dst);
    return refuse(from_id, m,
                  "context " + std::to_string(m.src_id) + " may not send to context " + std::to_string(dst) +
                      ": the router is unidirectional (docs/security.md)");
  }
  std::shared_ptr<stream> s;
  if (!shut_down_.load()) s = stream_for(dst);
  if (!s) {
    if (first_complaint(from_id, misrouted))
      spdlog::warn("mitogen: context {} sent to context {}; no route, dropped (logged once)", from_id, dst);
    return refuse(from_id, m, "no route to context " + std::to_string(dst));
  }
  if (s->queued_bytes() > max_forward_backlog) {
    // The broker thread never waits for a stream to drain, so a child flooding a
    // sibling that does not read would make us queue without bound.
    if (first_complaint(from_id, misrouted))
      spdlog::warn("mitogen: context {} sends to context {}, which is not reading ({} bytes queued); dropping "
                   "(logged once)",
                   from_id, dst, s->queued_bytes());
    return refuse(from_id, m, "context " + std::to_string(dst) + " is not reading; message dropped");
  }
  wire::message head;  // what refuse() needs if the send fails after the move
  head.src_id = m.src_id;
  head.reply_to = m.is_dead() ? 0 : m.reply_to;
  if (!s->send(std::move(m))) refuse(from_id, head, "no route to context " + std::to_string(dst));
}

bool router::first_complaint(std::uint32_t id, unsigned what) {
  auto& warned = complaints_[id];
  if (warned & what) return false;
  warned |= what;
  return true;
}

// ---------------------------------------------------------------- routes

void router::add_route(std::uint32_t id, std::string name, std::shared_ptr<stream> s, route_options opts) {
  // The stream keeps the router alive until it closes (the callbacks are dropped on
  // close), so a child's teardown always finds its router.
  auto self = shared_from_this();
  const bool trusted = opts.trusted;
  s->on_message([self, id, trusted](wire::message&& m) { self->on_stream_message(id, trusted, std::move(m)); });
  s->on_disconnect([self, id](std::error_code ec, const std::string& detail) {
    self->on_stream_gone(id, ec, detail);
  });
  table_->add_direct(id, std::move(name), std::move(s), my_id_, trusted);
}

std::shared_ptr<stream> router::stream_for(std::uint32_t id) const {
  if (auto s = table_->stream_for(id)) return s;
  // A client reaches everything else through its parent, while it is connected.
  if (parent_ && id != my_id_ && table_->contains(parent_id_)) return parent_;
  return nullptr;
}

std::uint32_t router::routed_via(std::uint32_t id) const { return table_->routed_via(id); }

std::vector<std::uint32_t> router::descendants_of(std::uint32_t id) const { return table_->descendants_of(id); }

std::string router::name_of(std::uint32_t id) const { return table_->name_of(id); }

void router::allow_forward(std::uint32_t from, std::uint32_t to, std::uint32_t handle) {
  table_->allow_forward(from, to, handle);
}

std::uint32_t router::allocate_id_via(std::uint32_t via_id) {
  auto id = table_->allocate_via(via_id, next_id_);
  if (!id)
    throw channel_error("mitogen: context " + std::to_string(via_id) + " is not connected; cannot start a context via it");
  return *id;
}

void router::on_add_route(std::uint32_t from_id, const wire::message& m) {
  std::uint32_t id = 0;
  std::string name;
  std::string why = parse_route(m.data, id, name) ? table_->add_descendant(from_id, m.src_id, id, name, my_id_)
                                                  : "malformed payload";
  if (!why.empty() && first_complaint(from_id, bad_route))
    spdlog::warn("mitogen: context {} ({}) sent ADD_ROUTE '{}': {}; refused (logged once)", from_id, name_of(from_id),
                 m.data.substr(0, 64), why);
}

void router::on_del_route(std::uint32_t from_id, const wire::message& m) {
  std::uint32_t id = 0;
  std::string name;
  detail::route_table::gone_list gone;
  if (parse_route(m.data, id, name)) gone = table_->remove_subtree(from_id, id);
  if (gone.empty()) {
    {
      // Already gone (an intermediary reports each context of a lost subtree).
      std::lock_guard lk(gone_mu_);
      if (gone_.count(id)) return;
    }
    if (first_complaint(from_id, bad_route))
      spdlog::warn("mitogen: context {} ({}) sent DEL_ROUTE '{}' for a context it does not route; ignored (logged "
                   "once)",
                   from_id, name_of(from_id), m.data.substr(0, 64));
    return;
  }
  for (auto& [gid, gname] : gone)
    spdlog::debug("mitogen: context {} ({}) disconnected (DEL_ROUTE from {})", gid, gname, m.src_id);
  contexts_gone(gone, "its parent, context " + std::to_string(m.src_id) + ", reported it gone");
}

void router::on_allocate_id(std::uint32_t from_id, const wire::message& m) {
  if (!m.reply_to) return;
  std::uint32_t first =
      shut_down_.load() ? 0 : table_->allocate_block(from_id, next_id_, id_block_size, max_blocks_per_child);
  if (!first) {
    if (first_complaint(from_id, bad_alloc))
      spdlog::warn("mitogen: context {} ({}) asked for more than {} id blocks; refused (logged once)", from_id,
                   name_of(from_id), max_blocks_per_child);
    return refuse(from_id, m, "ALLOCATE_ID refused: block limit reached");
  }
  wire::tuple t;
  t.items.emplace_back(static_cast<std::int64_t>(first));
  t.items.emplace_back(static_cast<std::int64_t>(first + id_block_size));
  wire::message reply;
  reply.dst_id = m.src_id;
  reply.handle = m.reply_to;
  reply.src_id = reply.auth_id = my_id_;
  reply.data = wire::encode(wire::value(std::move(t)));
  if (auto s = stream_for(from_id)) s->send(std::move(reply));
}

// ---------------------------------------------------------------- disconnects

void router::fail_waiters(std::uint32_t id, const std::string& reason) {
  std::vector<std::pair<std::uint32_t, handler_fn>> waiting;
  {
    std::lock_guard lk(handlers_mu_);
    auto rit = by_respondent_.find(id);
    if (rit != by_respondent_.end()) {
      for (auto h : rit->second) {
        auto it = handlers_.find(h);
        if (it == handlers_.end()) continue;
        waiting.emplace_back(h, std::move(it->second.fn));
        handlers_.erase(it);
      }
      by_respondent_.erase(rit);
    }
  }
  for (auto& [h, fn] : waiting) {
    auto dead = wire::message::dead(my_id_, h, reason);
    dead.src_id = id;
    fn(std::move(dead));
  }
}

void router::contexts_gone(const std::vector<std::pair<std::uint32_t, std::string>>& gone, const std::string& why) {
  // Clients of ours wait on these contexts too: tell them first.
  auto clients = table_->direct(true);
  for (auto& [cid, c] : clients) {
    for (auto& g : gone) {
      wire::message m;
      m.dst_id = cid;
      m.handle = wire::DEL_ROUTE;
      m.src_id = m.auth_id = my_id_;
      m.data = std::to_string(g.first);
      c->send(std::move(m));
    }
  }
  for (auto& [id, name] : gone) {
    fail_waiters(id, "context " + std::to_string(id) + (name.empty() ? "" : " (" + name + ")") +
                         " disconnected: " + why);
    logs_->context_gone(id, name);
    complaints_.erase(id);
  }
  {
    std::lock_guard lk(gone_mu_);
    for (auto& g : gone) gone_.insert(g.first);
  }
  gone_cv_.notify_all();
}

void router::disconnect(std::uint32_t id, std::error_code why, const std::string& detail) {
  if (auto s = stream_for(id)) {
    spdlog::warn("mitogen: disconnecting context {}: {}", id, detail);
    s->close(why, detail);
  }
}

bool router::wait_disconnected(std::uint32_t id, std::chrono::milliseconds timeout) {
  {
    std::lock_guard lk(gone_mu_);
    if (gone_.count(id) > 0) return true;
  }
  // The news comes through the broker (a DEL_ROUTE from an intermediary, for one):
  // no stream may stay parked meanwhile.
  broker::follower following(broker_);
  std::unique_lock lk(gone_mu_);
  return gone_cv_.wait_for(lk, timeout, [&] { return gone_.count(id) > 0; });
}

void router::add_teardown(std::uint32_t id, std::function<void(std::function<void()>)> fn) {
  std::lock_guard lk(gone_mu_);
  teardowns_[id] = std::move(fn);
}

void router::on_stream_gone(std::uint32_t id, std::error_code ec, const std::string& detail) {
  auto [name, descendants] = table_->remove_direct(id);
  if (ec == errc::protocol_error)
    spdlog::warn("mitogen: context {} ({}) broke the protocol and was disconnected: {}", id, name, detail);
  else
    spdlog::debug("mitogen: context {} ({}) disconnected: {}", id, name, detail);
  // Release every caller waiting on this context or on one reached through it, now.
  contexts_gone(descendants, "context " + std::to_string(id) + " (" + name +
                                 "), through which it was reached, disconnected: " + detail);
  contexts_gone({{id, name}}, detail);
  if (parent_ && id == parent_id_) {
    // Everything a client talks to is reached through its parent.
    std::vector<std::uint32_t> waited;
    {
      std::lock_guard lk(handlers_mu_);
      for (auto& [rid, hs] : by_respondent_) waited.push_back(rid);
    }
    for (auto rid : waited)
      fail_waiters(rid, "context " + std::to_string(rid) + " is unreachable: the connection to context " +
                            std::to_string(id) + " (" + name + ") closed: " + detail);
  }
  std::function<void(std::function<void()>)> teardown;
  {
    std::lock_guard lk(gone_mu_);
    auto it = teardowns_.find(id);
    if (it != teardowns_.end()) {
      teardown = std::move(it->second);
      teardowns_.erase(it);
      ++teardowns_running_;
    }
  }
  if (!teardown) return finish_shutdown_if_idle();
  teardown([self = shared_from_this()] {
    {
      std::lock_guard lk(self->gone_mu_);
      --self->teardowns_running_;
    }
    self->finish_shutdown_if_idle();
  });
}

// ---------------------------------------------------------------- shutdown

void router::finish_shutdown_if_idle() {
  std::function<void()> done;
  {
    std::lock_guard lk(gone_mu_);
    if (shutdown_done_ && teardowns_running_ == 0 && table_->empty()) {
      done = std::move(shutdown_done_);
      shutdown_done_ = nullptr;
    }
  }
  if (done) done();
}

void router::shutdown() {
  // Refuse new work at once: a call made after shutdown() returned must fail, even
  // though the children are told (and the waiters released) on the broker thread.
  // A caller reading its own reply would otherwise get it before the broker got
  // there.
  if (shut_down_.exchange(true)) return;
  auto self = shared_from_this();
  broker_->defer([self] { self->shutdown_on_broker([] {}); });  // a stopped broker has nothing left
}

void router::shutdown_on_broker(std::function<void()> done) {
  shut_down_.store(true);
  if (shutdown_begun_.exchange(true)) {
    // Already shut down by the user: finish when the remaining teardowns do.
    {
      std::lock_guard lk(gone_mu_);
      shutdown_done_ = [prev = std::move(shutdown_done_), done = std::move(done)] {
        if (prev) prev();
        done();
      };
    }
    return finish_shutdown_if_idle();
  }
  {
    std::lock_guard lk(gone_mu_);
    shutdown_done_ = std::move(done);
  }
  std::vector<std::shared_ptr<stream>> streams;
  for (auto& [id, s] : table_->direct(false)) {
    if (parent_ && id == parent_id_) {
      // Not ours to shut down, and nothing to wait for: a client just hangs up.
      // (Its writes go out inline, so nothing is left queued in practice.)
      s->close(make_error_code(errc::broker_shut_down), "client router shut down");
      continue;
    }
    wire::message m;
    m.dst_id = id;
    m.handle = wire::SHUTDOWN;
    m.src_id = m.auth_id = my_id_;
    s->send(std::move(m));
    streams.push_back(s);
  }
  // Keep reading while the children flush their last output and exit (their EOF
  // closes each stream); hang up on whoever is still there after the grace period.
  if (!streams.empty()) {
    // Weak references: a stream holds the broker, whose io_context holds this pending
    // wait, so strong ones would leak all three when the broker stops before it fires.
    auto timer = std::make_shared<boost::asio::steady_timer>(broker_->io(), shutdown_grace);
    std::vector<std::weak_ptr<stream>> weak(streams.begin(), streams.end());
    timer->async_wait([timer, weak = std::move(weak)](const boost::system::error_code&) {
      for (auto& w : weak)
        if (auto s = w.lock()) s->close(make_error_code(errc::broker_shut_down), "shutdown grace period ended");
    });
  }
  // Release callers that wait on no particular context.
  std::vector<std::pair<std::uint32_t, handler_fn>> rest;
  {
    std::lock_guard lk(handlers_mu_);
    for (auto it = handlers_.begin(); it != handlers_.end();) {
      if (it->first == wire::FORWARD_LOG) {
        ++it;
        continue;
      }
      rest.emplace_back(it->first, std::move(it->second.fn));
      it = handlers_.erase(it);
    }
    by_respondent_.clear();
  }
  for (auto& [h, fn] : rest) fn(wire::message::dead(my_id_, h, "router shut down"));
  finish_shutdown_if_idle();
}

}  // namespace mitogen
