#include "mitogen/routing/router.hpp"

#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

#include "mitogen/errors.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen {
namespace {

/// Bytes queued towards a context above which messages forwarded to it from other
/// children are refused (docs/via.md).
constexpr std::size_t max_forward_backlog = 64u << 20;

}  // namespace

// ---------------------------------------------------------------- receiver

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
  std::unique_lock lk(mu_);
  auto ready = [&] { return !q_.empty() || dead_.has_value(); };
  if (timeout) {
    if (!cv_.wait_for(lk, *timeout, ready)) throw timeout_error("receive timed out");
  } else {
    cv_.wait(lk, ready);
  }
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
  wire::message m = std::move(q_.front());
  q_.pop_front();
  if (m.is_dead()) dead_ = m;
  return m;
}

// ---------------------------------------------------------------- router

namespace {

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
                   if (auto self = weak.lock()) self->on_forward_log(m.src_id, m);
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

router::router(std::shared_ptr<broker> b) : broker_(std::move(b)) {}

// Streams hold the router until they close, so by now no child is connected.
router::~router() { broker_->remove_shutdown_hook(hook_id_); }

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

void router::deliver_local(wire::message&& m) {
  handler_fn fn;
  {
    std::lock_guard lk(handlers_mu_);
    auto it = handlers_.find(m.handle);
    if (it == handlers_.end()) {
      if (!m.is_dead()) spdlog::debug("mitogen: no handler for handle {} (from {})", m.handle, m.src_id);
      // Tell the sender nobody is listening, so its caller does not wait forever.
      if (m.reply_to && !m.is_dead() && m.src_id != my_id_) {
        auto dead = wire::message::dead(m.src_id, m.reply_to, "no such handle in context " + std::to_string(my_id_));
        dead.src_id = my_id_;
        dead.auth_id = my_id_;
        if (auto s = stream_for(m.src_id)) s->send(dead);
      }
      return;
    }
    auto& e = it->second;
    if (e.respondent && *e.respondent != m.src_id && m.src_id != my_id_) {
      if (first_complaint(m.src_id, peer_state::foreign_handle))
        spdlog::warn("mitogen: context {} sent to handle {} reserved for context {}; dropped (logged once)",
                     m.src_id, m.handle, *e.respondent);
      return;
    }
    if (e.policy && m.src_id != my_id_ && !e.policy(m)) {
      if (first_complaint(m.src_id, peer_state::refused_by_policy))
        spdlog::warn("mitogen: context {} may not send to handle {}; dropped (logged once)", m.src_id, m.handle);
      if (m.reply_to && !m.is_dead()) {
        auto dead = wire::message::dead(m.src_id, m.reply_to, "refused by the policy of handle " + std::to_string(m.handle));
        dead.src_id = dead.auth_id = my_id_;
        if (auto s = stream_for(m.src_id)) s->send(dead);
      }
      return;
    }
    if (e.persist && !m.is_dead()) {
      fn = e.fn;
    } else {
      fn = std::move(e.fn);
      if (e.respondent) {
        auto rit = by_respondent_.find(*e.respondent);
        if (rit != by_respondent_.end()) {
          rit->second.erase(m.handle);
          if (rit->second.empty()) by_respondent_.erase(rit);
        }
      }
      handlers_.erase(it);
    }
  }
  fn(std::move(m));
}

void router::on_parent_message(wire::message&& m) {
  if (m.dst_id != my_id_ || m.src_id == my_id_ || m.auth_id == my_id_) {
    if (first_complaint(parent_id_, peer_state::misrouted))
      spdlog::warn("mitogen: the parent sent a message for context {} from {}; a client routes nothing, dropped "
                   "(logged once)",
                   m.dst_id, m.src_id);
    return;
  }
  if (m.handle == wire::DEL_ROUTE && m.src_id == parent_id_ && !m.is_dead()) {
    std::uint32_t id = 0;
    std::string name;
    if (parse_route(m.data, id, name) && id != parent_id_ && id != my_id_)
      release_waiters(id, "context " + std::to_string(id) + " disconnected (reported by context " +
                              std::to_string(parent_id_) + ")");
    return;
  }
  deliver_local(std::move(m));
}

void router::on_stream_message(std::uint32_t from_id, bool trusted, wire::message&& m) {
  if (parent_ && from_id == parent_id_) return on_parent_message(std::move(m));
  // Source verification: a child speaks for itself and for the contexts routed
  // through it (via=), never for anybody else.
  if (!speaks_for(from_id, m.src_id) || !speaks_for(from_id, m.auth_id)) {
    if (first_complaint(from_id, peer_state::spoofed))
      spdlog::warn("mitogen: context {} ({}) sent a message claiming src_id={} auth_id={}; dropped (logged once)",
                   from_id, name_of(from_id), m.src_id, m.auth_id);
    return;
  }
  // A trusted client acts with our authority (upstream's unix listener does the same).
  if (trusted) m.auth_id = my_id_;
  if (m.dst_id == my_id_) {
    if (!m.is_dead()) {
      switch (m.handle) {
        case wire::ADD_ROUTE: return on_add_route(from_id, m);
        case wire::DEL_ROUTE: return on_del_route(from_id, m);
        case wire::ALLOCATE_ID: return on_allocate_id(from_id, m);
        default: break;
      }
    }
    deliver_local(std::move(m));
    return;
  }
  // For another context (a sibling, or a descendant of one): forward it as it is,
  // unless this router is unidirectional and nobody allowed that path.
  if (!trusted && unidirectional_.load() && !may_forward(from_id, m)) {
    if (first_complaint(from_id, peer_state::unidirectional))
      spdlog::warn("mitogen: context {} ({}) sent to context {}, which this unidirectional router does not allow; "
                   "refused (logged once)",
                   m.src_id, name_of(from_id), m.dst_id);
    refuse(from_id, m,
           "context " + std::to_string(m.src_id) + " may not send to context " + std::to_string(m.dst_id) +
               ": the router is unidirectional (docs/security.md)");
    return;
  }
  std::shared_ptr<stream> s;
  if (!shut_down_.load()) s = stream_for(m.dst_id);
  if (s && s->queued_bytes() > max_forward_backlog) {
    // The broker thread never waits for a stream to drain, so a child flooding a
    // sibling that does not read would make us queue without bound.
    if (first_complaint(from_id, peer_state::misrouted))
      spdlog::warn("mitogen: context {} sends to context {}, which is not reading ({} bytes queued); dropping "
                   "(logged once)",
                   from_id, m.dst_id, s->queued_bytes());
    refuse(from_id, m, "context " + std::to_string(m.dst_id) + " is not reading; message dropped");
    return;
  }
  if (s) {
    const auto dst = m.dst_id;
    const auto src = m.src_id;
    const auto reply_to = m.is_dead() ? 0 : m.reply_to;
    if (s->send(std::move(m)) || !reply_to) return;
    wire::message fake;
    fake.src_id = src;
    fake.reply_to = reply_to;
    refuse(from_id, fake, "no route to context " + std::to_string(dst));
    return;
  }
  if (first_complaint(from_id, peer_state::misrouted))
    spdlog::warn("mitogen: context {} sent to context {}; no route, dropped (logged once)", from_id, m.dst_id);
  refuse(from_id, m, "no route to context " + std::to_string(m.dst_id));
}

void router::refuse(std::uint32_t from_id, const wire::message& m, const std::string& reason) {
  if (!m.reply_to || m.is_dead()) return;
  auto dead = wire::message::dead(m.src_id, m.reply_to, reason);
  dead.src_id = my_id_;
  dead.auth_id = my_id_;
  if (auto s = stream_for(from_id)) s->send(std::move(dead));
}

bool router::trusted_locked(std::uint32_t id) const {
  auto it = routes_.find(id);
  if (it == routes_.end()) return false;
  if (it->second.via != id) it = routes_.find(it->second.via);
  return it != routes_.end() && it->second.trusted;
}

bool router::may_forward(std::uint32_t from_id, const wire::message& m) const {
  std::shared_lock lk(routes_mu_);
  if (trusted_locked(m.dst_id)) return true;
  auto g = grants_.find({m.dst_id, m.handle});
  return g != grants_.end() && g->second.count(m.src_id) > 0;
}

void router::forget_grants_locked(std::uint32_t id, const std::vector<std::pair<std::uint32_t, std::string>>& more) {
  if (grants_.empty()) return;
  std::unordered_set<std::uint32_t> gone;
  if (id) gone.insert(id);
  for (auto& g : more) gone.insert(g.first);
  for (auto it = grants_.begin(); it != grants_.end();) {
    if (gone.count(it->first.first)) {
      it = grants_.erase(it);
      continue;
    }
    for (auto f = it->second.begin(); f != it->second.end();) f = gone.count(*f) ? it->second.erase(f) : std::next(f);
    it = it->second.empty() ? grants_.erase(it) : std::next(it);
  }
}

void router::allow_forward(std::uint32_t from, std::uint32_t to, std::uint32_t handle) {
  std::unique_lock lk(routes_mu_);
  grants_[{to, handle}].insert(from);
}

void router::announce_gone(const std::vector<std::uint32_t>& ids) {
  std::vector<std::pair<std::uint32_t, std::shared_ptr<stream>>> clients;
  {
    std::shared_lock lk(routes_mu_);
    for (auto& [k, e] : routes_)
      if (e.trusted && e.via == k) clients.emplace_back(k, e.s);
  }
  for (auto& [cid, c] : clients) {
    for (auto id : ids) {
      wire::message m;
      m.dst_id = cid;
      m.handle = wire::DEL_ROUTE;
      m.src_id = m.auth_id = my_id_;
      m.data = std::to_string(id);
      c->send(std::move(m));
    }
  }
}

bool router::speaks_for(std::uint32_t from_id, std::uint32_t id) const {
  if (id == from_id) return true;  // the common case costs no lock
  std::shared_lock lk(routes_mu_);
  auto it = routes_.find(id);
  return it != routes_.end() && it->second.via == from_id;
}

std::uint32_t router::owner_of(std::uint32_t id) const {
  auto it = blocks_.upper_bound(id);
  if (it == blocks_.begin()) return 0;
  --it;
  return id < it->second.end ? it->second.owner : 0;
}

std::uint32_t router::allocate_id_via(std::uint32_t via_id) {
  std::unique_lock lk(routes_mu_);
  auto it = routes_.find(via_id);
  if (it == routes_.end())
    throw channel_error("mitogen: context " + std::to_string(via_id) + " is not connected; cannot start a context via it");
  const std::uint32_t id = next_id_.fetch_add(1);
  blocks_[id] = id_block{id + 1, it->second.via};
  return id;
}

std::uint32_t router::routed_via(std::uint32_t id) const {
  std::shared_lock lk(routes_mu_);
  auto it = routes_.find(id);
  return it == routes_.end() ? 0 : it->second.via;
}

std::vector<std::uint32_t> router::descendants_of(std::uint32_t id) const {
  std::vector<std::uint32_t> out;
  std::shared_lock lk(routes_mu_);
  for (auto& [k, e] : routes_)
    if (e.via == id && k != id) out.push_back(k);
  return out;
}


void router::on_add_route(std::uint32_t from_id, const wire::message& m) {
  std::uint32_t id = 0;
  std::string name;
  std::string why;
  if (!parse_route(m.data, id, name)) {
    why = "malformed payload";
  } else {
    std::unique_lock lk(routes_mu_);
    auto cur = routes_.find(id);
    auto parent = routes_.find(m.src_id);
    if (id == 0 || id == my_id_)
      why = "id " + std::to_string(id) + " is reserved";
    else if (owner_of(id) != from_id)
      why = "id " + std::to_string(id) + " was not allocated to this context";
    else if (cur != routes_.end() && cur->second.via != from_id)
      why = "id " + std::to_string(id) + " is routed elsewhere";
    else if (parent == routes_.end())
      why = "its parent is not connected";
    else {
      if (name.empty()) name = "context" + std::to_string(id);
      routes_[id] = route_entry{std::move(name), parent->second.s, from_id, m.src_id};
      return;
    }
  }
  if (first_complaint(from_id, peer_state::bad_route))
    spdlog::warn("mitogen: context {} ({}) sent ADD_ROUTE '{}': {}; refused (logged once)", from_id, name_of(from_id),
                 m.data.substr(0, 64), why);
}

void router::on_del_route(std::uint32_t from_id, const wire::message& m) {
  std::uint32_t id = 0;
  std::string name;
  std::vector<std::pair<std::uint32_t, std::string>> gone;
  if (parse_route(m.data, id, name) && id != from_id) {
    std::unique_lock lk(routes_mu_);
    auto it = routes_.find(id);
    if (it != routes_.end() && it->second.via == from_id) {
      // The context and everything it started (the agent reports each, but a
      // context that lost its parent cannot be reached either way).
      std::unordered_set<std::uint32_t> dead{id};
      gone.emplace_back(id, it->second.name);
      routes_.erase(it);
      for (bool more = true; more;) {
        more = false;
        for (auto r = routes_.begin(); r != routes_.end();) {
          if (r->second.via == from_id && dead.count(r->second.parent)) {
            dead.insert(r->first);
            gone.emplace_back(r->first, r->second.name);
            r = routes_.erase(r);
            more = true;
          } else {
            ++r;
          }
        }
      }
      forget_grants_locked(0, gone);
    }
  }
  if (gone.empty()) {
    {
      // Already gone (an intermediary reports each context of a lost subtree).
      std::lock_guard lk(gone_mu_);
      if (gone_.count(id)) return;
    }
    if (first_complaint(from_id, peer_state::bad_route))
      spdlog::warn("mitogen: context {} ({}) sent DEL_ROUTE '{}' for a context it does not route; ignored (logged "
                   "once)",
                   from_id, name_of(from_id), m.data.substr(0, 64));
    return;
  }
  {
    std::vector<std::uint32_t> ids;
    for (auto& g : gone) ids.push_back(g.first);
    announce_gone(ids);
  }
  for (auto& [gid, gname] : gone) {
    spdlog::debug("mitogen: context {} ({}) disconnected (DEL_ROUTE from {})", gid, gname, m.src_id);
    release_waiters(gid, "context " + std::to_string(gid) + " (" + gname + ") disconnected: its parent, context " +
                             std::to_string(m.src_id) + ", reported it gone");
  }
}

void router::on_allocate_id(std::uint32_t from_id, const wire::message& m) {
  if (!m.reply_to) return;
  std::uint32_t first = 0;
  {
    std::unique_lock lk(routes_mu_);
    std::size_t held = 0;
    for (auto& [k, b] : blocks_)
      if (b.owner == from_id && b.end - k > 1) ++held;
    if (held < max_blocks_per_child && !shut_down_.load()) {
      first = next_id_.fetch_add(id_block_size);
      blocks_[first] = id_block{first + id_block_size, from_id};
    }
  }
  if (!first) {
    if (first_complaint(from_id, peer_state::bad_alloc))
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

void router::release_waiters(std::uint32_t id, const std::string& reason) {
  fail_waiters(id, reason);
  {
    std::lock_guard lk(gone_mu_);
    gone_.insert(id);
  }
  gone_cv_.notify_all();
  peers_.erase(id);
}

bool router::first_complaint(std::uint32_t id, unsigned what) {
  auto& p = peers_[id];
  if (p.warned & what) return false;
  p.warned |= what;
  return true;
}

void router::on_forward_log(std::uint32_t from_id, const wire::message& m) {
  // A child may log a lot, but not drown the controller: a token bucket per child.
  auto& peer = peers_[from_id];
  auto now = std::chrono::steady_clock::now();
  peer.log_tokens = std::min(log_burst, peer.log_tokens + log_rate * std::chrono::duration<double>(now - peer.log_refill).count());
  peer.log_refill = now;
  if (peer.log_tokens < 1.0) {
    if (peer.logs_dropped++ == 0 && first_complaint(from_id, peer_state::flooding))
      spdlog::warn("mitogen: context {} ({}) sends more than {} log records per second; dropping the excess "
                   "(logged once)",
                   from_id, name_of(from_id), log_rate);
    return;
  }
  peer.log_tokens -= 1.0;
  // "name\0level\0text"; anything malformed is shown as it is.
  std::string logger = "?", text;
  int level = 20;
  auto a = m.data.find('\0');
  auto b = a == std::string::npos ? std::string::npos : m.data.find('\0', a + 1);
  if (b != std::string::npos) {
    logger = m.data.substr(0, a);
    try {
      level = std::stoi(m.data.substr(a + 1, b - a - 1));
    } catch (...) {
    }
    text = m.data.substr(b + 1);
  } else {
    text = m.data;
  }
  std::string name = name_of(from_id);
  log_sink sink;
  {
    std::lock_guard lk(sink_mu_);
    sink = log_sink_;
  }
  if (sink) {
    sink(from_id, name, logger, level, text);
    return;
  }
  auto lvl = level >= 40 ? spdlog::level::err
             : level >= 30 ? spdlog::level::warn
             : level >= 20 ? spdlog::level::info
                           : spdlog::level::debug;
  spdlog::log(lvl, "[{}] {}: {}", name, logger, text);
}

void router::set_log_sink(log_sink sink) {
  std::lock_guard lk(sink_mu_);
  log_sink_ = std::move(sink);
}

void router::add_route(std::uint32_t id, std::string name, std::shared_ptr<stream> s, route_options opts) {
  // The stream keeps the router alive until it closes (the callbacks are dropped on
  // close), so a child's teardown always finds its router.
  auto self = shared_from_this();
  const bool trusted = opts.trusted;
  s->on_message([self, id, trusted](wire::message&& m) { self->on_stream_message(id, trusted, std::move(m)); });
  s->on_disconnect([self, id](std::error_code ec, const std::string& detail) {
    self->on_stream_gone(id, ec, detail);
  });
  std::unique_lock lk(routes_mu_);
  routes_[id] = route_entry{std::move(name), std::move(s), id, my_id_, trusted};
}

std::shared_ptr<stream> router::stream_for(std::uint32_t id) const {
  std::shared_lock lk(routes_mu_);
  auto it = routes_.find(id);
  if (it != routes_.end()) return it->second.s;
  // A client reaches everything else through its parent, while it is connected.
  if (parent_ && id != my_id_ && routes_.count(parent_id_)) return parent_;
  return nullptr;
}

std::string router::name_of(std::uint32_t id) const {
  std::shared_lock lk(routes_mu_);
  auto it = routes_.find(id);
  return it == routes_.end() ? std::string() : it->second.name;
}

void router::disconnect(std::uint32_t id, std::error_code why, const std::string& detail) {
  if (auto s = stream_for(id)) {
    spdlog::warn("mitogen: disconnecting context {}: {}", id, detail);
    s->close(why, detail);
  }
}

bool router::wait_disconnected(std::uint32_t id, std::chrono::milliseconds timeout) {
  std::unique_lock lk(gone_mu_);
  return gone_cv_.wait_for(lk, timeout, [&] { return gone_.count(id) > 0; });
}

void router::add_teardown(std::uint32_t id, std::function<void(std::function<void()>)> fn) {
  std::lock_guard lk(gone_mu_);
  teardowns_[id] = std::move(fn);
}

void router::on_stream_gone(std::uint32_t id, std::error_code ec, const std::string& detail) {
  std::string name;
  std::vector<std::pair<std::uint32_t, std::string>> descendants;
  {
    std::unique_lock lk(routes_mu_);
    auto it = routes_.find(id);
    if (it != routes_.end()) {
      name = it->second.name;
      routes_.erase(it);
    }
    // Everything started through this child is unreachable now.
    for (auto r = routes_.begin(); r != routes_.end();) {
      if (r->second.via == id) {
        descendants.emplace_back(r->first, r->second.name);
        r = routes_.erase(r);
      } else {
        ++r;
      }
    }
    for (auto b = blocks_.begin(); b != blocks_.end();) b = b->second.owner == id ? blocks_.erase(b) : std::next(b);
    forget_grants_locked(id, descendants);
  }
  if (ec == errc::protocol_error)
    spdlog::warn("mitogen: context {} ({}) broke the protocol and was disconnected: {}", id, name, detail);
  else
    spdlog::debug("mitogen: context {} ({}) disconnected: {}", id, name, detail);
  if (auto p = peers_.find(id); p != peers_.end()) {
    if (p->second.logs_dropped)
      spdlog::warn("mitogen: dropped {} log records from context {} ({})", p->second.logs_dropped, id, name);
    peers_.erase(p);
  }
  {
    std::vector<std::uint32_t> ids{id};
    for (auto& d : descendants) ids.push_back(d.first);
    announce_gone(ids);
  }
  // Release every caller waiting on this context or on one reached through it, now.
  for (auto& [did, dname] : descendants)
    release_waiters(did, "context " + std::to_string(did) + " (" + dname + ") disconnected: context " +
                             std::to_string(id) + " (" + name + "), through which it was reached, disconnected: " +
                             detail);
  fail_waiters(id, "context " + std::to_string(id) + " (" + name + ") disconnected: " + detail);
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
    gone_.insert(id);
    auto it = teardowns_.find(id);
    if (it != teardowns_.end()) {
      teardown = std::move(it->second);
      teardowns_.erase(it);
      ++teardowns_running_;
    }
  }
  gone_cv_.notify_all();
  if (teardown) {
    auto self = shared_from_this();
    teardown([self] {
      std::function<void()> done;
      {
        std::lock_guard lk(self->gone_mu_);
        --self->teardowns_running_;
        if (self->teardowns_running_ == 0 && self->shutdown_done_) {
          std::shared_lock rl(self->routes_mu_);
          if (self->routes_.empty()) done = std::move(self->shutdown_done_);
        }
      }
      if (done) done();
    });
  } else if (shut_down_.load()) {
    std::function<void()> done;
    {
      std::lock_guard lk(gone_mu_);
      std::shared_lock rl(routes_mu_);
      if (teardowns_running_ == 0 && routes_.empty() && shutdown_done_) done = std::move(shutdown_done_);
    }
    if (done) done();
  }
}

void router::shutdown() {
  if (shut_down_.load()) return;
  auto self = shared_from_this();
  if (!broker_->defer([self] { self->shutdown_on_broker([] {}); })) shut_down_.store(true);
}

void router::shutdown_on_broker(std::function<void()> done) {
  if (shut_down_.exchange(true)) {
    // Already shut down by the user: finish when the remaining teardowns do.
    bool finished;
    {
      std::lock_guard lk(gone_mu_);
      std::shared_lock rl(routes_mu_);
      finished = routes_.empty() && teardowns_running_ == 0;
      if (!finished) {
        shutdown_done_ = [prev = std::move(shutdown_done_), done = std::move(done)] {
          if (prev) prev();
          done();
        };
      }
    }
    if (finished) done();
    return;
  }
  std::vector<std::pair<std::uint32_t, std::shared_ptr<stream>>> targets;
  std::vector<std::shared_ptr<stream>> streams;
  {
    std::shared_lock lk(routes_mu_);
    for (auto& [id, e] : routes_) {
      if (e.via != id) continue;  // reached through a child: it goes with that child
      targets.emplace_back(id, e.s);
      streams.push_back(e.s);
    }
  }
  {
    std::lock_guard lk(gone_mu_);
    shutdown_done_ = std::move(done);
  }
  for (auto& [id, s] : targets) {
    if (parent_ && id == parent_id_) {
      // Not ours to shut down, and nothing to wait for: a client just hangs up.
      // (Its writes go out inline, so nothing is left queued in practice.)
      std::erase(streams, s);
      s->close(make_error_code(errc::broker_shut_down), "client router shut down");
      continue;
    }
    wire::message m;
    m.dst_id = id;
    m.handle = wire::SHUTDOWN;
    m.src_id = m.auth_id = my_id_;
    s->send(std::move(m));
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
  std::function<void()> now;
  {
    std::lock_guard lk(gone_mu_);
    std::shared_lock rl(routes_mu_);
    if (routes_.empty() && teardowns_running_ == 0) now = std::move(shutdown_done_);
  }
  if (now) now();
}

}  // namespace mitogen
