#pragma once
/// Module responder: answers children's GET_MODULE with LOAD_MODULE, serving
/// Python source the controlling program can import (docs/protocol.md, "Modules").
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mitogen/routing/router.hpp"
#include "mitogen/wire/message.hpp"

namespace mitogen {

/// What a module_resolver found: one module the controlling program can import.
struct module_source {
  /// Where the module lives, sent to the child (its `__file__` is "master:" + path).
  /// When `source` is nullopt the responder reads the source from this file itself:
  /// it must then be an absolute path whose real path is a regular `.py` file.
  std::string path;
  /// The source bytes when they do not come from a plain `.py` file (a module in a
  /// zip archive, one a custom import hook provides, "" for a namespace package).
  /// Without a file to check, such a module costs a resolver call on every request.
  std::optional<std::string> source;
  /// A package: the child may import its submodules.
  bool is_package = false;
  /// A package's direct submodules (names without dots); the child asks for no
  /// others. Names that are not identifiers are dropped.
  std::vector<std::string> submodules;
};

/// Finds `fullname` the way the controlling program would import it, at request
/// time; nullopt if the program could not import it or must not serve it (the
/// standard library). Called on the responder's worker thread, never on the broker
/// thread, one call at a time; it may block. An exception refuses the request.
using module_resolver = std::function<std::optional<module_source>(const std::string& fullname)>;

/// What a module_responder serves. Fixed once the responder exists.
struct module_responder_options {
  /// Directories searched in order, like sys.path (for programs without Python,
  /// and when `resolver` is not set). Entries that are not directories (zip files,
  /// missing paths) are ignored; relative ones are taken from the working directory
  /// at create().
  std::vector<std::string> search_path;
  /// If set, modules are looked up with it instead of in `search_path` (the Python
  /// API passes one that follows the live sys.modules, sys.path and sys.meta_path).
  module_resolver resolver;
  /// The controller's main script, served as module "__main__" up to its
  /// `if __name__ == '__main__':` guard (refused if it has none).
  std::optional<std::string> main_script;
  /// If not empty, only names starting with one of these prefixes are served.
  /// Plain string prefixes of the dotted name, as upstream's whitelist.
  std::vector<std::string> allow;
  /// Names starting with one of these prefixes are refused (wins over allow).
  std::vector<std::string> deny;
  /// Top-level names (the part before the first dot) that are never served and
  /// never looked up, without a refusal: the Python API passes the standard
  /// library's module names, which every context has itself.
  std::vector<std::string> excluded;
  /// Largest source served, in bytes; bigger ones are refused.
  std::size_t max_source_size = 16u * 1024u * 1024u;
  /// GET_MODULE requests waiting for the worker at most; further ones get a dead
  /// reply (the child's import fails at once) until the worker catches up.
  std::size_t max_pending = 1024;
};

/// Serves Python modules to the router's children. Created with create(), owned
/// by shared_ptr (keep it as long as children may import); the router holds only
/// the request queue. Registers the GET_MODULE handler (one responder per router);
/// destroying the responder removes it, after which requests get dead replies.
///
/// The broker thread only queues requests: a worker thread owned by the responder
/// looks modules up (search path or resolver), reads, compresses and scans them,
/// and hands the answers to the broker thread to send (a child that stops reading
/// never blocks the worker). Answers are cached by name and content: a request for a
/// module already built re-reads its file (no resolver call, no zlib) and reuses
/// the answer if the content is unchanged, so a context started after an edit gets
/// the edited module; negative answers are not cached. Each context is sent each
/// module at most once, plus the related modules it is likely to need next (those
/// in the same top-level package, or in one already sent to it). Everything a child
/// sends is validated: names must be dotted ASCII identifiers, files must be `.py`
/// sources (in `search_path` mode: whose real path lies inside a served directory).
/// Refusals are negative answers, logged once per context.
class module_responder {
 public:
  using options = module_responder_options;

  /// Counters, for tests and statistics. Any thread.
  struct stats {
    std::uint64_t requests = 0;        ///< GET_MODULE messages handled
    std::uint64_t modules_sent = 0;    ///< positive LOAD_MODULE messages sent
    std::uint64_t negatives_sent = 0;  ///< negative LOAD_MODULE messages sent
    std::uint64_t refused = 0;         ///< requests refused (bad name, denied, outside the path, queue full)
    std::uint64_t bytes_sent = 0;      ///< LOAD_MODULE payload bytes sent
    std::uint64_t builds = 0;          ///< answers built (zlib and import scan of a new or changed source)
    std::uint64_t resolver_calls = 0;  ///< calls of options::resolver
  };

  /// Create a responder, start its worker thread and register it on `r` for
  /// GET_MODULE. Any thread.
  static std::shared_ptr<module_responder> create(std::shared_ptr<router> r, options opts);
  /// Unregisters, answers the requests still queued with dead replies and joins the
  /// worker (which may be inside the resolver: the caller must not hold anything the
  /// resolver waits for, such as Python's GIL). Not on the broker thread.
  ~module_responder();
  module_responder(const module_responder&) = delete;
  module_responder& operator=(const module_responder&) = delete;

  /// Counters so far.
  stats get_stats() const;
  /// Names sent to context `context_id` (positive or negative), sorted.
  std::vector<std::string> sent_to(std::uint32_t context_id) const;

  /// The LOAD_MODULE payload that answers a request for `fullname` now (negative if
  /// it is not served). Runs on the worker thread and waits for it; any other thread
  /// (tests).
  std::string payload_for(const std::string& fullname);

 private:
  struct entry;  // one cached answer
  struct found;  // a module's source, as found for one request
  struct queue;  // requests from the broker thread to the worker
  using entry_ptr = std::shared_ptr<entry>;

  module_responder(std::shared_ptr<router> r, options opts);
  void run();                                        // the worker thread
  void handle(std::uint32_t ctx, std::uint32_t reply_to, const std::string& name, std::size_t bad_size);  // worker
  entry_ptr current(const std::string& fullname);                          // worker
  std::optional<found> find(const std::string& fullname, std::string& why);  // worker
  std::optional<found> resolve(const std::string& fullname, std::string& why, bool read = true);  // worker
  bool importable(const std::string& fullname);                            // worker
  entry_ptr build(const std::string& fullname, found&& f);                 // worker
  const std::string& payload_of(const std::string& fullname, entry& e);    // worker
  std::vector<std::string> related_of(const std::string& fullname, const entry& e);  // worker
  void send(std::uint32_t context_id, const std::string& fullname, entry& e, bool record = true);  // worker
  void post(wire::message m);  // worker: route `m` from the broker thread
  void refuse(std::uint32_t context_id, const std::string& what, const std::string& why);  // worker
  void forget_gone_contexts();                                             // worker

  std::shared_ptr<router> router_;
  options opts_;
  std::vector<std::string> roots_;  ///< realpaths of the served directories, search order
  std::vector<std::string> dirs_;   ///< the same directories as given (for paths on the wire)
  std::unordered_set<std::string> excluded_;  ///< opts_.excluded
  std::shared_ptr<queue> queue_;    ///< shared with the GET_MODULE handler
  std::thread worker_;

  // The worker's own state: only the worker thread touches it.
  std::unordered_map<std::string, entry_ptr> cache_;  ///< positive answers by name
  std::unordered_set<std::uint32_t> warned_;          ///< contexts already told off in the log
  std::size_t prune_at_ = 64;                         ///< sent_ size that triggers forget_gone_contexts()

  mutable std::mutex mu_;  // guards what other threads read: sent_ (written by the worker only) and stats_
  std::unordered_map<std::uint32_t, std::unordered_set<std::string>> sent_;
  stats stats_;
};

}  // namespace mitogen
