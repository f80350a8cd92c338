#pragma once
/// The router's routing state (private to the routing layer): which stream reaches
/// each context, which ids each direct child's subtree owns (ALLOCATE_ID blocks,
/// router::allocate_id_via), and the forwarding grants of unidirectional mode. It
/// knows nothing of handlers or messages beyond ids; the policies that need both
/// (ADD_ROUTE, DEL_ROUTE, ALLOCATE_ID) decide here on the ids the router parsed.
/// Thread-safe: one shared mutex, never held while calling out.
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "mitogen/io/stream.hpp"

namespace mitogen::detail {

class route_table {
 public:
  /// (id, name) of contexts removed together.
  using gone_list = std::vector<std::pair<std::uint32_t, std::string>>;
  using stream_list = std::vector<std::pair<std::uint32_t, std::shared_ptr<stream>>>;

  /// Route `id` to its own stream (a direct child, a client, or a client's parent).
  void add_direct(std::uint32_t id, std::string name, std::shared_ptr<stream> s, std::uint32_t parent,
                  bool trusted);
  /// Forget direct context `id`, everything routed through its stream, the id
  /// blocks it owned and every grant from or to any of them. Returns its name ("" if
  /// unknown) and the descendants removed.
  std::pair<std::string, gone_list> remove_direct(std::uint32_t id);

  /// The stream leading to `id`, if routed.
  std::shared_ptr<stream> stream_for(std::uint32_t id) const;
  /// The direct context whose stream leads to `id` (itself if direct); 0 if unrouted.
  std::uint32_t routed_via(std::uint32_t id) const;
  /// Every context routed through direct context `id`'s stream, `id` excluded.
  std::vector<std::uint32_t> descendants_of(std::uint32_t id) const;
  std::string name_of(std::uint32_t id) const;
  bool contains(std::uint32_t id) const;
  bool empty() const;
  /// How replies from `id` arrive: the stream, the direct context it belongs to, and
  /// whether that stream is trusted (a client). One lock, for a caller about to read
  /// the stream itself (router::lead_for).
  struct via_stream {
    std::shared_ptr<stream> s;
    std::uint32_t via = 0;
    bool trusted = false;
  };
  std::optional<via_stream> route_of(std::uint32_t id) const;
  /// True if `id` is `from_id` or routed through its stream.
  bool speaks_for(std::uint32_t from_id, std::uint32_t id) const;
  /// Direct streams; with `trusted_only`, only the trusted ones (clients).
  stream_list direct(bool trusted_only) const;

  /// Unidirectional policy: may `src`'s message to handle `handle` of `dst` be
  /// forwarded (the stream leading to `dst` is trusted, or allow_forward granted it)?
  bool may_forward(std::uint32_t src, std::uint32_t dst, std::uint32_t handle) const;
  void allow_forward(std::uint32_t from, std::uint32_t to, std::uint32_t handle);

  /// A new id (from `next`) for a context that `via_id` will start, owned by the
  /// subtree of the direct child leading to `via_id`. nullopt if `via_id` is unrouted.
  std::optional<std::uint32_t> allocate_via(std::uint32_t via_id, std::atomic<std::uint32_t>& next);
  /// ALLOCATE_ID for direct child `from_id`: the first id of a new block of `size`,
  /// or 0 if it already holds `max_blocks` blocks.
  std::uint32_t allocate_block(std::uint32_t from_id, std::atomic<std::uint32_t>& next, std::uint32_t size,
                               std::size_t max_blocks);
  /// ADD_ROUTE policy: route `id` (named `name`, started by `parent`) through direct
  /// child `from_id`. Returns "" if done, else why it was refused. `reserved` ids
  /// (ours) may never be claimed.
  std::string add_descendant(std::uint32_t from_id, std::uint32_t parent, std::uint32_t id, std::string name,
                             std::uint32_t reserved);
  /// DEL_ROUTE policy: `id`, routed through direct child `from_id`, and every
  /// context it started, are removed (with their grants). Empty if `from_id` does
  /// not route `id`.
  gone_list remove_subtree(std::uint32_t from_id, std::uint32_t id);

 private:
  struct entry {
    std::string name;
    std::shared_ptr<stream> s;
    std::uint32_t via = 0;     ///< direct context whose stream this is (== id when direct)
    std::uint32_t parent = 0;  ///< context that started it
    bool trusted = false;      ///< route_options::trusted (direct entries only)
  };
  /// An id range [first, end) handed to a direct child's subtree.
  struct id_block {
    std::uint32_t end;
    std::uint32_t owner;  ///< direct child id
  };
  std::uint32_t owner_of(std::uint32_t id) const;                  // mu_ held
  void forget_grants(const std::unordered_set<std::uint32_t>& ids);  // mu_ held (unique)

  mutable std::shared_mutex mu_;
  std::unordered_map<std::uint32_t, entry> routes_;
  std::map<std::uint32_t, id_block> blocks_;
  /// allow_forward() grants: (to, handle) -> the contexts that may send there.
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::unordered_set<std::uint32_t>> grants_;
};

}  // namespace mitogen::detail
