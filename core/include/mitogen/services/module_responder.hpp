#pragma once
/// Module responder: answers children's GET_MODULE with LOAD_MODULE, serving
/// Python source found on the controller's search path (docs/protocol.md,
/// "Modules").
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mitogen/routing/router.hpp"
#include "mitogen/wire/message.hpp"

namespace mitogen {

/// What a module_responder serves. Fixed once the responder exists.
struct module_responder_options {
  /// Directories searched in order, like sys.path (the Python API passes the
  /// controller's sys.path without the standard library). Entries that are not
  /// directories (zip files, missing paths) are ignored; relative ones are taken
  /// from the working directory at create().
  std::vector<std::string> search_path;
  /// The controller's main script, served as module "__main__" up to its
  /// `if __name__ == '__main__':` guard (refused if it has none).
  std::optional<std::string> main_script;
  /// If not empty, only names starting with one of these prefixes are served.
  /// Plain string prefixes of the dotted name, as upstream's whitelist.
  std::vector<std::string> allow;
  /// Names starting with one of these prefixes are refused (wins over allow).
  std::vector<std::string> deny;
  /// Largest source file served, in bytes; bigger ones are refused.
  std::size_t max_source_size = 16u * 1024u * 1024u;
};

/// Serves Python modules to the router's children. Created with create(), owned
/// by shared_ptr (keep it as long as children may import); the router holds only
/// a weak reference. Registers the GET_MODULE handler (one responder per router);
/// destroying the responder removes it, after which requests get dead replies.
///
/// Requests are handled on the broker thread. Each answer is built once (file
/// read, zlib, pickle) and cached for the life of the responder; each context is
/// sent each module at most once, plus the related modules it is likely to need
/// next (those in the same top-level package, or in one already sent to it).
/// Everything a child sends is validated: names must be dotted ASCII identifiers,
/// files must be `.py` sources whose real path lies inside a served directory.
/// Refusals are negative answers, logged once per context.
class module_responder : public std::enable_shared_from_this<module_responder> {
 public:
  using options = module_responder_options;

  /// Counters, for tests and statistics. Any thread.
  struct stats {
    std::uint64_t requests = 0;        ///< GET_MODULE messages handled
    std::uint64_t modules_sent = 0;    ///< positive LOAD_MODULE messages sent
    std::uint64_t negatives_sent = 0;  ///< negative LOAD_MODULE messages sent
    std::uint64_t refused = 0;         ///< requests refused (bad name, denied, outside the path)
    std::uint64_t bytes_sent = 0;      ///< LOAD_MODULE payload bytes sent
  };

  /// Create a responder and register it on `r` for GET_MODULE. Any thread.
  static std::shared_ptr<module_responder> create(std::shared_ptr<router> r, options opts);
  ~module_responder();
  module_responder(const module_responder&) = delete;
  module_responder& operator=(const module_responder&) = delete;

  /// Counters so far.
  stats get_stats() const;
  /// Names sent to context `context_id` (positive or negative), sorted.
  std::vector<std::string> sent_to(std::uint32_t context_id) const;

  /// The LOAD_MODULE payload that answers a request for `fullname` (negative if
  /// it is not served). Cached. Any thread; used by the handler and by tests.
  std::string payload_for(const std::string& fullname);

 private:
  struct entry;  // one cached answer
  module_responder(std::shared_ptr<router> r, options opts);
  void on_get_module(wire::message&& m);  // broker thread
  std::shared_ptr<const entry> build(const std::string& fullname);  // with mu_ held
  std::vector<std::string> related_of(const std::string& fullname);  // with mu_ held
  const std::vector<std::string>& imports_of(const std::string& fullname);  // with mu_ held
  void send(std::uint32_t context_id, const std::string& fullname, const entry& e, bool record = true);  // with mu_ held
  void refuse(std::uint32_t context_id, const std::string& what, const std::string& why);  // with mu_ held
  void forget_gone_contexts();  // with mu_ held

  std::shared_ptr<router> router_;
  options opts_;
  std::vector<std::string> roots_;  ///< realpaths of the served directories, search order
  std::vector<std::string> dirs_;   ///< the same directories as given (for paths on the wire)

  mutable std::mutex mu_;  // guards everything below
  std::unordered_map<std::string, std::shared_ptr<const entry>> cache_;
  std::size_t negatives_ = 0;  ///< negative entries in cache_
  std::unordered_map<std::string, std::vector<std::string>> imports_;  ///< direct, resolved imports
  std::unordered_map<std::uint32_t, std::unordered_set<std::string>> sent_;
  std::unordered_set<std::uint32_t> warned_;  ///< contexts already told off in the log
  std::size_t prune_at_ = 64;                 ///< sent_ size that triggers forget_gone_contexts()
  stats stats_;
};

}  // namespace mitogen
