#include "route_table.hpp"

namespace mitogen::detail {

void route_table::add_direct(std::uint32_t id, std::string name, std::shared_ptr<stream> s, std::uint32_t parent,
                             bool trusted) {
  std::unique_lock lk(mu_);
  routes_[id] = entry{std::move(name), std::move(s), id, parent, trusted};
}

std::pair<std::string, route_table::gone_list> route_table::remove_direct(std::uint32_t id) {
  std::pair<std::string, gone_list> out;
  std::unordered_set<std::uint32_t> gone{id};
  std::unique_lock lk(mu_);
  if (auto it = routes_.find(id); it != routes_.end()) {
    out.first = it->second.name;
    routes_.erase(it);
  }
  for (auto r = routes_.begin(); r != routes_.end();) {
    if (r->second.via == id) {
      out.second.emplace_back(r->first, r->second.name);
      gone.insert(r->first);
      r = routes_.erase(r);
    } else {
      ++r;
    }
  }
  for (auto b = blocks_.begin(); b != blocks_.end();) b = b->second.owner == id ? blocks_.erase(b) : std::next(b);
  forget_grants(gone);
  return out;
}

std::shared_ptr<stream> route_table::stream_for(std::uint32_t id) const {
  std::shared_lock lk(mu_);
  auto it = routes_.find(id);
  return it == routes_.end() ? nullptr : it->second.s;
}

std::optional<route_table::via_stream> route_table::route_of(std::uint32_t id) const {
  std::shared_lock lk(mu_);
  auto it = routes_.find(id);
  if (it == routes_.end()) return std::nullopt;
  auto d = routes_.find(it->second.via);
  return via_stream{it->second.s, it->second.via, d != routes_.end() && d->second.trusted};
}

std::uint32_t route_table::routed_via(std::uint32_t id) const {
  std::shared_lock lk(mu_);
  auto it = routes_.find(id);
  return it == routes_.end() ? 0 : it->second.via;
}

std::vector<std::uint32_t> route_table::descendants_of(std::uint32_t id) const {
  std::vector<std::uint32_t> out;
  std::shared_lock lk(mu_);
  for (auto& [k, e] : routes_)
    if (e.via == id && k != id) out.push_back(k);
  return out;
}

std::string route_table::name_of(std::uint32_t id) const {
  std::shared_lock lk(mu_);
  auto it = routes_.find(id);
  return it == routes_.end() ? std::string() : it->second.name;
}

bool route_table::contains(std::uint32_t id) const {
  std::shared_lock lk(mu_);
  return routes_.count(id) > 0;
}

bool route_table::empty() const {
  std::shared_lock lk(mu_);
  return routes_.empty();
}

bool route_table::speaks_for(std::uint32_t from_id, std::uint32_t id) const {
  if (id == from_id) return true;  // the common case costs no lock
  std::shared_lock lk(mu_);
  auto it = routes_.find(id);
  return it != routes_.end() && it->second.via == from_id;
}

route_table::stream_list route_table::direct(bool trusted_only) const {
  stream_list out;
  std::shared_lock lk(mu_);
  for (auto& [id, e] : routes_)
    if (e.via == id && (e.trusted || !trusted_only)) out.emplace_back(id, e.s);
  return out;
}

bool route_table::may_forward(std::uint32_t src, std::uint32_t dst, std::uint32_t handle) const {
  std::shared_lock lk(mu_);
  if (auto it = routes_.find(dst); it != routes_.end()) {
    auto d = it->second.via == dst ? it : routes_.find(it->second.via);
    if (d != routes_.end() && d->second.trusted) return true;
  }
  auto g = grants_.find({dst, handle});
  return g != grants_.end() && g->second.count(src) > 0;
}

void route_table::allow_forward(std::uint32_t from, std::uint32_t to, std::uint32_t handle) {
  std::unique_lock lk(mu_);
  grants_[{to, handle}].insert(from);
}

void route_table::forget_grants(const std::unordered_set<std::uint32_t>& ids) {
  for (auto it = grants_.begin(); it != grants_.end();) {
    if (ids.count(it->first.first)) {
      it = grants_.erase(it);
      continue;
    }
    for (auto f = it->second.begin(); f != it->second.end();) f = ids.count(*f) ? it->second.erase(f) : std::next(f);
    it = it->second.empty() ? grants_.erase(it) : std::next(it);
  }
}

std::uint32_t route_table::owner_of(std::uint32_t id) const {
  auto it = blocks_.upper_bound(id);
  if (it == blocks_.begin()) return 0;
  --it;
  return id < it->second.end ? it->second.owner : 0;
}

std::optional<std::uint32_t> route_table::allocate_via(std::uint32_t via_id, std::atomic<std::uint32_t>& next) {
  std::unique_lock lk(mu_);
  auto it = routes_.find(via_id);
  if (it == routes_.end()) return std::nullopt;
  const std::uint32_t id = next.fetch_add(1);
  blocks_[id] = id_block{id + 1, it->second.via};
  return id;
}

std::uint32_t route_table::allocate_block(std::uint32_t from_id, std::atomic<std::uint32_t>& next,
                                          std::uint32_t size, std::size_t max_blocks) {
  std::unique_lock lk(mu_);
  std::size_t held = 0;
  for (auto& [k, b] : blocks_)
    if (b.owner == from_id && b.end - k > 1) ++held;
  if (held >= max_blocks) return 0;
  const std::uint32_t first = next.fetch_add(size);
  blocks_[first] = id_block{first + size, from_id};
  return first;
}

std::string route_table::add_descendant(std::uint32_t from_id, std::uint32_t parent, std::uint32_t id,
                                        std::string name, std::uint32_t reserved) {
  std::unique_lock lk(mu_);
  auto cur = routes_.find(id);
  auto up = routes_.find(parent);
  if (id == 0 || id == reserved) return "id " + std::to_string(id) + " is reserved";
  if (owner_of(id) != from_id) return "id " + std::to_string(id) + " was not allocated to this context";
  if (cur != routes_.end() && cur->second.via != from_id) return "id " + std::to_string(id) + " is routed elsewhere";
  if (up == routes_.end()) return "its parent is not connected";
  if (name.empty()) name = "context" + std::to_string(id);
  routes_[id] = entry{std::move(name), up->second.s, from_id, parent, false};
  return {};
}

route_table::gone_list route_table::remove_subtree(std::uint32_t from_id, std::uint32_t id) {
  gone_list gone;
  if (id == from_id) return gone;
  std::unique_lock lk(mu_);
  auto it = routes_.find(id);
  if (it == routes_.end() || it->second.via != from_id) return gone;
  // The context and everything it started (the agent reports each, but a context
  // that lost its parent cannot be reached either way).
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
  forget_grants(dead);
  return gone;
}

}  // namespace mitogen::detail
