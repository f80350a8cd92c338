#include "registry.hpp"

#include <malloc.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "mitogen/errors.hpp"

namespace mitogen::mux::detail {

// ---------------------------------------------------------------- work_pool

bool work_pool::post(std::function<void()> job) {
  std::unique_lock lk(mu_);
  if (stopping_) return false;
  jobs_.push_back(std::move(job));
  if (idle_ == 0 && alive_ < max_) {
    ++alive_;
    threads_.emplace_back([this] { run(); });
  } else {
    cv_.notify_one();
  }
  return true;
}

void work_pool::run() {
  std::unique_lock lk(mu_);
  for (;;) {
    ++idle_;
    cv_.wait(lk, [&] { return stopping_ || !jobs_.empty(); });
    --idle_;
    if (jobs_.empty()) break;  // stopping, and nothing left to run
    auto job = std::move(jobs_.front());
    jobs_.pop_front();
    lk.unlock();
    job();
    job = nullptr;  // what it captured goes now, not under the lock
    lk.lock();
  }
  --alive_;
}

void work_pool::stop() {
  std::vector<std::thread> ts;
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
    ts.swap(threads_);
  }
  cv_.notify_all();
  for (auto& t : ts)
    if (t.joinable()) t.join();
}

std::size_t work_pool::threads() const {
  std::lock_guard lk(mu_);
  return alive_;
}

// ---------------------------------------------------------------- registry

std::shared_ptr<registry> registry::create(std::shared_ptr<router> r, options opts) {
  return std::shared_ptr<registry>(new registry(std::move(r), std::move(opts)));
}

registry::~registry() { pool_.stop(); }

void registry::connect(connection_stack stack, std::uint32_t client, done_fn done) {
  auto rq = std::make_shared<request>(request{std::move(stack), client, std::move(done)});
  step(rq, 0, std::nullopt);
}

void registry::touch_locked(entry& e, std::uint32_t client) {
  e.last_used = clock::now();
  ++e.uses;
  if (!client || (opts_.attached && !opts_.attached(client))) return;
  if (e.clients.insert(client).second) client_keys_[client].insert(e.key);
}

void registry::step(const std::shared_ptr<request>& rq, std::size_t i, std::optional<context> via) {
  // Walk the hops: warm ones inline, the first cold one on the pool (which comes
  // back here for the rest).
  for (;;) {
    const std::string key = stack_key(rq->stack, i + 1);
    std::shared_ptr<entry> fresh;
    std::optional<context> ready;
    std::vector<context> evicted;
    {
      std::unique_lock lk(mu_);
      if (shut_) {
        lk.unlock();
        rq->done({std::nullopt, make_error_code(errc::broker_shut_down), "mitogen-mux: the daemon is shutting down"});
        return;
      }
      auto it = entries_.find(key);
      if (it != entries_.end() && it->second->ctx) {
        touch_locked(*it->second, rq->client);
        ready = it->second->ctx;
      } else if (it != entries_.end()) {
        // Somebody is connecting this hop already: continue when they are done.
        std::weak_ptr<registry> weak = weak_from_this();
        it->second->waiters.push_back([weak, rq, i, via](const connect_result& r) {
          auto self = weak.lock();
          if (!r.ok() || !self) return rq->done(r);
          self->step(rq, i, via);
        });
        return;
      } else {
        fresh = std::make_shared<entry>();
        fresh->key = key;
        fresh->description = describe_stack(rq->stack, i + 1);
        entries_[key] = fresh;
        evicted = enforce_limit_locked(key);
      }
    }
    shut_down(evicted);
    if (fresh) {
      auto self = shared_from_this();
      if (!pool_.post([self, rq, i, via, fresh] { self->run_connect(rq, i, via, fresh); })) {
        run_connect(rq, i, via, fresh);  // stopping: fails at once (the router is shut down)
      }
      return;
    }
    if (i + 1 == rq->stack.size()) {
      rq->done({std::move(ready), {}, {}});
      return;
    }
    via = std::move(ready);
    ++i;
  }
}

void registry::run_connect(const std::shared_ptr<request>& rq, std::size_t i, const std::optional<context>& via,
                           const std::shared_ptr<entry>& e) {
  connect_result r;
  const auto started = clock::now();
  try {
    r.ctx = connect_hop(*router_, rq->stack[i], via);
  } catch (const stream_error& x) {
    r.ec = x.code();
    r.message = x.what();
  } catch (const std::exception& x) {
    r.message = x.what();
  }
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - started).count();
  if (r.ok()) {
    spdlog::info("mitogen-mux: connected {} as context {} ({}) in {} ms", e->description, r.ctx->id(), r.ctx->name(), ms);
  } else {
    spdlog::warn("mitogen-mux: cannot connect {}: {}", e->description, r.message);
    if (rq->stack.size() > 1) r.message = "mitogen-mux: " + e->description + ": " + r.message;
  }

  // Hear the context's death, so the next connect() makes a new one.
  std::uint32_t watch = 0;
  if (r.ok()) {
    std::weak_ptr<registry> weak = weak_from_this();
    const auto id = r.ctx->id();
    watch = router_->add_handler(
        [weak, id](wire::message&&) {
          if (auto self = weak.lock()) self->on_gone(id);
        },
        {.handle = 0, .persist = true, .respondent = id});
  }

  std::vector<std::function<void(const connect_result&)>> waiters;
  bool abandoned = false;
  {
    std::lock_guard lk(mu_);
    waiters.swap(e->waiters);
    auto it = entries_.find(e->key);
    const bool current = it != entries_.end() && it->second == e && !e->abandoned;
    if (!r.ok()) {
      if (current) entries_.erase(it);  // the next connect() tries again
    } else if (!current) {
      abandoned = true;
    } else {
      e->ctx = r.ctx;
      e->watch = watch;
      e->created = e->last_used = clock::now();
      by_id_[r.ctx->id()] = e->key;
    }
  }
  if (abandoned) {
    router_->del_handler(watch);
    r.ctx->shutdown(false);
    r = {std::nullopt, make_error_code(errc::child_died),
         "mitogen-mux: " + e->description + " was reset while it was being connected"};
  } else if (r.ok() && !router_->stream_for(r.ctx->id())) {
    on_gone(r.ctx->id());  // it died before the watcher was in place
  }
  // Bootstraps leave garbage behind (the preamble, zlib state); hand it back.
  ::malloc_trim(0);
  for (auto& w : waiters) w(r);
  if (!r.ok()) return rq->done(std::move(r));
  step(rq, i, via);
}

void registry::on_gone(std::uint32_t id) {
  std::vector<context> doomed;
  {
    std::lock_guard lk(mu_);
    auto b = by_id_.find(id);
    if (b == by_id_.end()) return;
    const std::string key = b->second;
    auto it = entries_.find(key);
    if (it == entries_.end() || !it->second->ctx || it->second->ctx->id() != id) {
      by_id_.erase(b);
      return;
    }
    spdlog::info("mitogen-mux: context {} ({}) is gone; the next connect makes a new one", id,
                 it->second->description);
    doomed = remove_subtree_locked(key);
  }
  // The context itself is gone already; whatever was started through it goes too.
  std::erase_if(doomed, [id](const context& c) { return c.id() == id; });
  shut_down(doomed);
}

std::vector<context> registry::remove_subtree_locked(const std::string& key, std::size_t* count) {
  std::vector<std::shared_ptr<entry>> gone;
  for (auto it = entries_.lower_bound(key); it != entries_.end() && it->first.compare(0, key.size(), key) == 0;) {
    gone.push_back(it->second);
    it = entries_.erase(it);
  }
  std::vector<context> out;
  // Deepest first: a context started through another is asked to stop before it.
  std::sort(gone.begin(), gone.end(), [](auto& a, auto& b) { return a->key.size() > b->key.size(); });
  for (auto& e : gone) {
    e->abandoned = true;
    for (auto c : e->clients) {
      auto ck = client_keys_.find(c);
      if (ck != client_keys_.end()) ck->second.erase(e->key);
    }
    if (e->ctx) {
      by_id_.erase(e->ctx->id());
      if (e->watch) router_->del_handler(e->watch);
      out.push_back(*e->ctx);
    }
  }
  if (count) *count = gone.size();
  return out;
}

bool registry::in_use_locked(const std::string& key) const {
  for (auto it = entries_.lower_bound(key); it != entries_.end() && it->first.compare(0, key.size(), key) == 0; ++it)
    if (!it->second->ctx || !it->second->clients.empty()) return true;
  return false;
}

std::vector<context> registry::enforce_limit_locked(const std::string& keep) {
  std::vector<context> out;
  while (entries_.size() > opts_.max_contexts) {
    std::shared_ptr<entry> victim;
    for (auto& [k, e] : entries_) {
      if (!e->ctx || !e->clients.empty()) continue;
      if (keep.compare(0, k.size(), k) == 0) continue;  // `keep` itself or one of its hops
      if (victim && e->last_used >= victim->last_used) continue;
      if (in_use_locked(k)) continue;
      victim = e;
    }
    if (!victim) {
      if (!warned_full_)
        spdlog::warn("mitogen-mux: {} contexts, more than max_contexts ({}), and every one is in use; keeping them",
                     entries_.size(), opts_.max_contexts);
      warned_full_ = true;
      break;
    }
    warned_full_ = false;
    spdlog::info("mitogen-mux: max_contexts ({}) reached: shutting down {}, idle the longest", opts_.max_contexts,
                 victim->description);
    auto more = remove_subtree_locked(victim->key);
    out.insert(out.end(), more.begin(), more.end());
  }
  return out;
}

void registry::shut_down(const std::vector<context>& doomed) {
  for (const auto& c : doomed) c.shutdown(false);
}

std::size_t registry::reset(const connection_stack& stack) {
  const std::string key = stack_key(stack);
  std::vector<context> doomed;
  std::size_t n = 0;
  {
    std::lock_guard lk(mu_);
    doomed = remove_subtree_locked(key, &n);
  }
  if (n) spdlog::info("mitogen-mux: reset {} ({} context(s))", describe_stack(stack), n);
  shut_down(doomed);
  return n;
}

void registry::client_gone(std::uint32_t client) {
  std::vector<context> evicted;
  {
    std::lock_guard lk(mu_);
    auto ck = client_keys_.find(client);
    if (ck == client_keys_.end()) return;
    const auto now = clock::now();
    for (auto& key : ck->second) {
      auto it = entries_.find(key);
      if (it == entries_.end()) continue;
      it->second->clients.erase(client);
      it->second->last_used = now;
    }
    client_keys_.erase(ck);
    evicted = enforce_limit_locked("");
  }
  shut_down(evicted);
}

wire::list registry::status() const {
  wire::list out;
  std::lock_guard lk(mu_);
  const auto now = clock::now();
  auto secs = [&](clock::time_point t) { return std::chrono::duration<double>(now - t).count(); };
  for (auto& [k, e] : entries_) {
    wire::dict d;
    auto put = [&](const char* name, wire::value v) { d.items.emplace_back(wire::str{name}, std::move(v)); };
    put("id", e->ctx ? wire::value(static_cast<std::int64_t>(e->ctx->id())) : wire::value(wire::none{}));
    put("name", e->ctx ? wire::value(wire::str{e->ctx->name()}) : wire::value(wire::none{}));
    put("stack", wire::str{e->description});
    put("state", wire::str{e->ctx ? "connected" : "connecting"});
    put("age", secs(e->created));
    put("idle", secs(e->last_used));
    put("uses", static_cast<std::int64_t>(e->uses));
    put("clients", static_cast<std::int64_t>(e->clients.size()));
    out.items.emplace_back(std::move(d));
  }
  return out;
}

std::size_t registry::size() const {
  std::lock_guard lk(mu_);
  return entries_.size();
}

void registry::shutdown() {
  {
    std::lock_guard lk(mu_);
    shut_ = true;
  }
  pool_.stop();
}

}  // namespace mitogen::mux::detail
