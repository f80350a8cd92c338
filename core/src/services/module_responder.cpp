#include "mitogen/services/module_responder.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <pthread.h>

#include <algorithm>
#include <deque>
#include <filesystem>
#include <future>
#include <set>
#include <spdlog/spdlog.h>
#include <string_view>

#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/pickle.hpp"
#include "mitogen/wire/value.hpp"

namespace fs = std::filesystem;

namespace mitogen {

namespace {

// Longest module name accepted (CPython has no limit; real names are < 100).
constexpr std::size_t max_name_len = 512;
// Longest path a resolver may give (it is sent to the child and logged).
constexpr std::size_t max_path_len = 4096;
// Bound on the related-module closure of one module, so that a package whose
// modules import each other widely cannot make one request read thousands of files.
constexpr std::size_t max_related = 500;

bool is_ident_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_ident_char(char c) { return is_ident_start(c) || (c >= '0' && c <= '9'); }

bool is_identifier(std::string_view s) {
  if (s.empty() || !is_ident_start(s[0])) return false;
  return std::all_of(s.begin() + 1, s.end(), is_ident_char);
}

/// A dotted name of ASCII identifiers: "a", "a.b_c". Rules out "..", "/", absolute
/// paths, empty components. (Non-ASCII identifiers, legal in Python 3, are refused.)
bool is_dotted_name(std::string_view s) {
  if (s.empty() || s.size() > max_name_len) return false;
  std::size_t start = 0;
  while (true) {
    auto dot = s.find('.', start);
    if (!is_identifier(s.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start)))
      return false;
    if (dot == std::string_view::npos) return true;
    start = dot + 1;
  }
}

/// Safe to echo back in a negative answer and to log: printable ASCII, bounded.
bool is_printable(std::string_view s) {
  return s.size() <= max_name_len &&
         std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
}

std::string top_of(const std::string& name) { return name.substr(0, name.find('.')); }

std::string parent_of(const std::string& name) {
  auto dot = name.rfind('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

bool is_regular_file(const std::string& path) {
  struct ::stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool ends_with_py(const std::string& path) { return path.size() > 3 && path.compare(path.size() - 3, 3, ".py") == 0; }

/// Read a whole regular file; false if it is not one, is bigger than `max`, or fails.
bool read_file(const std::string& path, std::size_t max, std::string& out, std::string& why) {
  // `path` is already a realpath: O_NOFOLLOW refuses a symlink swapped in since.
  // TODO(security): a directory component swapped for a symlink between realpath()
  // and open() is not caught; it needs write access to a served directory.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    why = "cannot open " + path;
    return false;
  }
  struct ::stat st {};
  bool ok = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  if (!ok) why = path + " is not a regular file";
  if (ok && static_cast<std::size_t>(st.st_size) > max) {
    ok = false;
    why = path + " is larger than the " + std::to_string(max) + "-byte limit";
  }
  if (ok) {
    out.resize(static_cast<std::size_t>(st.st_size));
    std::size_t got = 0;
    while (got < out.size()) {
      auto n = ::read(fd, out.data() + got, out.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
    }
    out.resize(got);
  }
  ::close(fd);
  return ok;
}

/// The script up to its `if __name__ == '__main__':` line (upstream's rule:
/// `^if\s+__name__\s*==\s*.__main__.\s*:`), or nullopt if it has no such line.
std::optional<std::string> cut_at_main_guard(const std::string& src) {
  auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\f' || c == '\v' || c == '\r'; };
  std::size_t pos = 0;
  while (pos < src.size()) {
    std::size_t end = src.find('\n', pos);
    if (end == std::string::npos) end = src.size();
    std::string_view line(src.data() + pos, end - pos);
    std::size_t i = 0;
    auto skip_ws = [&] { while (i < line.size() && ws(line[i])) ++i; };
    auto eat = [&](std::string_view word) {
      if (line.substr(i, word.size()) != word) return false;
      i += word.size();
      return true;
    };
    if (eat("if") && i < line.size() && ws(line[i])) {
      skip_ws();
      if (eat("__name__")) {
        skip_ws();
        if (eat("==")) {
          skip_ws();
          if (i < line.size()) {
            ++i;  // the opening quote
            if (eat("__main__") && i < line.size()) {
              ++i;  // the closing quote
              skip_ws();
              if (eat(":")) return src.substr(0, pos);
            }
          }
        }
      }
    }
    pos = end + 1;
  }
  return std::nullopt;
}

/// Names a module's import statements may refer to, found with a line-based scan
/// (good enough: upstream scans bytecode). `import a.b` gives a.b; `from a import b`
/// gives a and a.b (b may be a submodule); relative imports are resolved against
/// `fullname`. Text inside triple-quoted strings is skipped.
std::vector<std::string> scan_imports(const std::string& src, const std::string& fullname, bool is_pkg) {
  std::vector<std::string> out;
  auto first_token = [](std::string_view s) {
    std::size_t a = s.find_first_not_of(" \t()");
    if (a == std::string_view::npos) return std::string_view{};
    std::size_t b = s.find_first_of(" \t()", a);
    return s.substr(a, b == std::string_view::npos ? std::string_view::npos : b - a);
  };
  auto each_item = [&](std::string_view list, auto&& fn) {
    std::size_t start = 0;
    while (start <= list.size()) {
      std::size_t comma = list.find(',', start);
      auto item = first_token(list.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
      if (!item.empty()) fn(std::string(item));
      if (comma == std::string_view::npos) break;
      start = comma + 1;
    }
  };

  bool in_string = false;
  std::size_t pos = 0;
  while (pos < src.size()) {
    // One logical line: joined over backslash continuations and open parentheses.
    std::string line;
    int depth = 0;
    do {
      std::size_t end = src.find('\n', pos);
      if (end == std::string::npos) end = src.size();
      std::string_view part(src.data() + pos, end - pos);
      pos = end + 1;
      // Triple quotes toggle string state; an odd count on a line flips it.
      std::size_t quotes = 0;
      for (std::string_view q : {"\"\"\"", "'''"}) {
        for (std::size_t at = part.find(q); at != std::string_view::npos; at = part.find(q, at + 3)) ++quotes;
      }
      bool was_in_string = in_string;
      if (quotes % 2) in_string = !in_string;
      if (was_in_string || quotes) break;  // docstring text, or a line that starts/ends one
      if (auto hash = part.find('#'); hash != std::string_view::npos) part = part.substr(0, hash);
      line.append(part);
      depth += static_cast<int>(std::count(part.begin(), part.end(), '(')) -
               static_cast<int>(std::count(part.begin(), part.end(), ')'));
      bool cont = !line.empty() && line.back() == '\\';
      if (cont) line.pop_back();
      if (!cont && depth <= 0) break;
      line.push_back(' ');
    } while (pos < src.size());

    std::string_view s(line);
    std::size_t a = s.find_first_not_of(" \t");
    if (a == std::string_view::npos) continue;
    s = s.substr(a);
    if (s.substr(0, 7) == "import " || s.substr(0, 7) == "import\t") {
      each_item(s.substr(7), [&](std::string name) {
        if (is_dotted_name(name)) out.push_back(std::move(name));
      });
    } else if (s.substr(0, 5) == "from " || s.substr(0, 5) == "from\t") {
      s = s.substr(5);
      s = s.substr(std::min(s.size(), s.find_first_not_of(" \t")));
      std::size_t level = 0;
      while (level < s.size() && s[level] == '.') ++level;
      s = s.substr(level);
      std::size_t name_end = s.find_first_of(" \t");
      std::string mod(s.substr(0, name_end));
      if (name_end == std::string_view::npos) continue;
      s = s.substr(name_end);
      s = s.substr(std::min(s.size(), s.find_first_not_of(" \t")));
      if (s.substr(0, 7) != "import " && s.substr(0, 7) != "import\t" && s.substr(0, 7) != "import(") continue;
      std::string base;
      if (level == 0) {
        if (!is_dotted_name(mod)) continue;
        base = mod;
      } else {
        base = is_pkg ? fullname : parent_of(fullname);
        for (std::size_t i = 1; i < level && !base.empty(); ++i) base = parent_of(base);
        if (base.empty()) continue;
        if (!mod.empty()) {
          if (!is_dotted_name(mod)) continue;
          base += "." + mod;
        }
      }
      if (level == 0 || !mod.empty()) out.push_back(base);
      each_item(s.substr(6), [&](const std::string& name) {
        if (is_identifier(name)) out.push_back(base + "." + name);
      });
    }
  }
  return out;
}

std::string compress(const std::string& src) {
  uLongf len = ::compressBound(static_cast<uLong>(src.size()));
  std::string out(len, '\0');
  if (::compress2(reinterpret_cast<Bytef*>(out.data()), &len, reinterpret_cast<const Bytef*>(src.data()),
                  static_cast<uLong>(src.size()), 9) != Z_OK)
    throw std::runtime_error("zlib compress2 failed");
  out.resize(len);
  return out;
}

std::string negative_payload(const std::string& fullname) {
  // (fullname, None, None, None, ()) exactly as upstream's negative answer.
  return wire::encode(wire::tuple{{wire::str{fullname}, wire::none{}, wire::none{}, wire::none{}, wire::tuple{}}});
}

}  // namespace

/// One cached answer: a module found, what it was built from, and the LOAD_MODULE
/// payload. Negative answers are entries too, but never cached.
struct module_responder::entry {
  bool found = false;
  std::string refusal;  ///< why it is refused ("" if simply absent or found)
  // What the answer was built from, compared with what a later request finds.
  std::string path;                     ///< tuple[2]
  std::string file;                     ///< real path the source was read from ("" if the resolver gave it)
  bool is_pkg = false;
  std::vector<std::string> submodules;  ///< tuple[1] of a package
  std::size_t size = 0;                 ///< of the source
  std::size_t hash = 0;                 ///< of the source
  std::string compressed;               ///< tuple[3]
  std::vector<std::string> imports;     ///< modules it imports that we could serve (resolved names)
  std::vector<std::string> related;     ///< tuple[4], set with `payload`
  std::string payload;                  ///< the pickled tuple; built when first sent
};

/// A module's source as found for one request.
struct module_responder::found {
  std::string path;                     ///< sent to the child
  std::string file;                     ///< real path the source was read from ("" if not from a file)
  std::string source;
  bool is_pkg = false;
  std::vector<std::string> submodules;  ///< sorted, identifiers only
};

/// Requests handed from the broker thread to the worker. Shared by the responder
/// and the GET_MODULE handler, so the broker thread never keeps the responder alive.
struct module_responder::queue {
  struct job {
    std::uint32_t ctx = 0;
    std::uint32_t reply_to = 0;
    std::string name;
    std::size_t bad_size = 0;     ///< payload too long to be a name: its size (name left empty)
    std::function<void()> fn;     ///< if set, run this instead (payload_for)
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<job> jobs;
  std::size_t requests = 0;  ///< GET_MODULE jobs in `jobs`
  std::uint64_t turned_away = 0;  ///< requests refused because the queue was full
  bool closed = false;
  bool warned_full = false;
};

namespace {

std::size_t hash_of(const std::string& s) { return std::hash<std::string_view>{}(s); }

bool printable_path(std::string_view s) {
  return !s.empty() && s.size() <= max_path_len &&
         std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x20 && c != 0x7f; });
}

void dead_reply(router& r, std::uint32_t ctx, std::uint32_t reply_to, const std::string& why) {
  if (reply_to) r.route(wire::message::dead(ctx, reply_to, why));
}

}  // namespace

std::shared_ptr<module_responder> module_responder::create(std::shared_ptr<router> r, options opts) {
  auto self = std::shared_ptr<module_responder>(new module_responder(std::move(r), std::move(opts)));
  self->worker_ = std::thread([s = self.get()] { s->run(); });
  // The handler only queues (broker thread: no file, no lock held for long, no GIL).
  // The router owns the handler, so the raw router pointer is valid whenever it runs.
  router* rt = self->router_.get();
  self->router_->add_handler(
      [q = self->queue_, rt, max = self->opts_.max_pending](wire::message&& m) {
        if (m.is_dead()) return;
        queue::job j;
        j.ctx = m.src_id;
        j.reply_to = m.reply_to;
        if (m.data.size() > max_name_len) {
          j.bad_size = m.data.size();  // not a name: the worker refuses it; keep no copy
        } else {
          j.name = std::move(m.data);
        }
        std::unique_lock lk(q->mu);
        if (q->closed || q->requests >= max) {
          bool warn = !q->closed && !q->warned_full;
          if (warn) q->warned_full = true;
          q->turned_away += !q->closed;
          lk.unlock();
          if (warn)
            spdlog::warn("mitogen: {} module requests are waiting; refusing further ones until they are answered",
                         max);
          dead_reply(*rt, j.ctx, j.reply_to, "GET_MODULE refused: the module responder is busy or gone");
          return;
        }
        ++q->requests;
        q->jobs.push_back(std::move(j));
        lk.unlock();
        q->cv.notify_one();
      },
      {.handle = wire::GET_MODULE, .persist = true, .respondent = std::nullopt});
  return self;
}

module_responder::module_responder(std::shared_ptr<router> r, options opts)
    : router_(std::move(r)),
      opts_(std::move(opts)),
      excluded_(opts_.excluded.begin(), opts_.excluded.end()),
      queue_(std::make_shared<queue>()) {
  if (!opts_.resolver) {
    for (const auto& p : opts_.search_path) {
      std::error_code ec;
      fs::path dir = fs::absolute(p.empty() ? fs::path(".") : fs::path(p), ec).lexically_normal();
      if (ec || !fs::is_directory(dir, ec)) continue;
      auto real = fs::canonical(dir, ec);
      if (ec) continue;
      std::string d = dir.string();
      while (d.size() > 1 && d.back() == '/') d.pop_back();
      dirs_.push_back(std::move(d));
      roots_.push_back(real.string());
    }
  }
  if (opts_.main_script) {
    std::error_code ec;
    opts_.main_script = fs::absolute(*opts_.main_script, ec).lexically_normal().string();
  }
}

module_responder::~module_responder() {
  router_->del_handler(wire::GET_MODULE);
  {
    std::lock_guard lk(queue_->mu);
    queue_->closed = true;
  }
  queue_->cv.notify_all();
  if (worker_.joinable()) worker_.join();
}

module_responder::stats module_responder::get_stats() const {
  std::uint64_t turned_away = 0;
  {
    std::lock_guard lk(queue_->mu);
    turned_away = queue_->turned_away;
  }
  std::lock_guard lk(mu_);
  stats s = stats_;
  s.requests += turned_away;
  s.refused += turned_away;
  return s;
}

std::vector<std::string> module_responder::sent_to(std::uint32_t context_id) const {
  std::lock_guard lk(mu_);
  std::vector<std::string> out;
  if (auto it = sent_.find(context_id); it != sent_.end()) out.assign(it->second.begin(), it->second.end());
  std::sort(out.begin(), out.end());
  return out;
}

void module_responder::run() {
  ::pthread_setname_np(::pthread_self(), "mitogen-modules");
  auto& q = *queue_;
  for (;;) {
    queue::job j;
    {
      std::unique_lock lk(q.mu);
      q.cv.wait(lk, [&] { return q.closed || !q.jobs.empty(); });
      if (q.closed) break;
      j = std::move(q.jobs.front());
      q.jobs.pop_front();
      if (!j.fn) --q.requests;
      if (q.requests == 0) q.warned_full = false;
    }
    try {
      if (j.fn) {
        j.fn();
      } else {
        handle(j.ctx, j.reply_to, j.name, j.bad_size);
      }
    } catch (const std::exception& e) {
      // Never lose the worker, and never leave a child waiting.
      spdlog::error("mitogen: module request {} from context {} failed: {}", j.name, j.ctx, e.what());
      if (!j.fn && j.reply_to) post(wire::message::dead(j.ctx, j.reply_to, std::string("GET_MODULE failed: ") + e.what()));
    }
  }
  // Closed: what is still queued gets an answer that releases its waiter.
  std::deque<queue::job> left;
  {
    std::lock_guard lk(q.mu);
    left.swap(q.jobs);
    q.requests = 0;
  }
  for (auto& j : left) {
    if (j.fn) {
      j.fn();
    } else {
      if (j.reply_to) post(wire::message::dead(j.ctx, j.reply_to, "GET_MODULE refused: the module responder is gone"));
    }
  }
}

namespace {

/// Where a module's source lives (search_path mode).
struct located {
  std::string path;  ///< as found on the search path (sent to the child)
  std::string real;  ///< realpath, checked to lie inside a served directory
  bool is_pkg = false;
};

bool allowed(const module_responder_options& o, const std::string& name) {
  if (!o.allow.empty() && std::none_of(o.allow.begin(), o.allow.end(), [&](auto& p) { return starts_with(name, p); }))
    return false;
  return std::none_of(o.deny.begin(), o.deny.end(), [&](auto& p) { return starts_with(name, p); });
}

bool inside(const std::vector<std::string>& roots, const std::string& real) {
  return std::any_of(roots.begin(), roots.end(), [&](const std::string& root) {
    return real.size() > root.size() && starts_with(real, root) && (root == "/" || real[root.size()] == '/');
  });
}

/// Find `fullname` the way importlib's PathFinder finds source files: the top-level
/// name in the first directory that has it (a package `a/__init__.py` before a module
/// `a.py`; directories without `__init__.py` are skipped: no namespace packages),
/// then each further component inside the package found. Returns nullopt if absent;
/// `why` is set if it exists but may not be served.
std::optional<located> locate(const std::vector<std::string>& dirs, const std::vector<std::string>& roots,
                              const std::string& fullname, std::string& why) {
  std::vector<std::string> parts;
  for (std::size_t start = 0;;) {
    auto dot = fullname.find('.', start);
    parts.push_back(fullname.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  for (const auto& dir : dirs) {
    const std::string root = dir == "/" ? std::string() : dir;
    located loc;
    std::string base = root + "/" + parts[0];
    if (is_regular_file(base + "/__init__.py")) {
      loc = {base + "/__init__.py", {}, true};
    } else if (is_regular_file(base + ".py")) {
      loc = {base + ".py", {}, false};
    } else {
      continue;  // not in this directory: try the next one
    }
    // Further components live in the package found, and nowhere else.
    for (std::size_t i = 1; i < parts.size(); ++i) {
      if (!loc.is_pkg) return std::nullopt;
      base += "/" + parts[i];
      if (is_regular_file(base + "/__init__.py")) {
        loc = {base + "/__init__.py", {}, true};
      } else if (is_regular_file(base + ".py")) {
        loc = {base + ".py", {}, false};
      } else {
        return std::nullopt;
      }
    }
    std::error_code ec;
    loc.real = fs::canonical(loc.path, ec).string();
    if (ec) {
      why = "cannot resolve " + loc.path;
      return std::nullopt;
    }
    if (!ends_with_py(loc.real)) {
      why = loc.path + " resolves to " + loc.real + ", not a .py source";
      return std::nullopt;
    }
    if (!inside(roots, loc.real)) {
      why = loc.path + " resolves to " + loc.real + ", outside the served directories";
      return std::nullopt;
    }
    return loc;
  }
  return std::nullopt;
}

/// A package's submodules as pkgutil.iter_modules() lists them, sources only (a
/// native extension could not be served anyway).
std::vector<std::string> submodules_in(const fs::path& dir) {
  std::set<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (ends_with_py(name)) {
      name.resize(name.size() - 3);
      if (name != "__init__" && is_identifier(name) && is_regular_file(it->path().string())) names.insert(name);
    } else if (is_identifier(name) && is_regular_file(it->path().string() + "/__init__.py")) {
      names.insert(name);
    }
  }
  return {names.begin(), names.end()};
}

}  // namespace

std::optional<module_responder::found> module_responder::resolve(const std::string& fullname, std::string& why,
                                                                  bool read) {
  {
    std::lock_guard lk(mu_);
    ++stats_.resolver_calls;
  }
  std::optional<module_source> r;
  try {
    r = opts_.resolver(fullname);
  } catch (const std::exception& e) {
    why = std::string("the resolver failed: ") + e.what();
    return std::nullopt;
  }
  if (!r) return std::nullopt;
  if (!printable_path(r->path)) {
    why = "the resolver gave no usable path (empty, too long or control characters)";
    return std::nullopt;
  }
  found f;
  f.path = std::move(r->path);
  f.is_pkg = r->is_package;
  if (f.is_pkg) {
    std::set<std::string> names;
    for (auto& n : r->submodules)
      if (is_identifier(n)) names.insert(std::move(n));
    f.submodules.assign(names.begin(), names.end());
  }
  if (r->source) {
    if (r->source->size() > opts_.max_source_size) {
      why = f.path + " is larger than the " + std::to_string(opts_.max_source_size) + "-byte limit";
      return std::nullopt;
    }
    f.source = std::move(*r->source);
    return f;
  }
  // A file for us to read: only a .py source, whatever symlinks lead there.
  if (f.path.front() != '/') {
    why = f.path + " is not an absolute path";
    return std::nullopt;
  }
  std::error_code ec;
  f.file = fs::canonical(f.path, ec).string();
  if (ec) {
    why = "cannot resolve " + f.path;
    return std::nullopt;
  }
  if (!ends_with_py(f.file)) {
    why = f.path + " resolves to " + f.file + ", not a .py source";
    return std::nullopt;
  }
  if (read && !read_file(f.file, opts_.max_source_size, f.source, why)) return std::nullopt;
  return f;
}

std::optional<module_responder::found> module_responder::find(const std::string& fullname, std::string& why) {
  if (fullname == "__main__") {
    found f;
    if (!opts_.main_script || !read_file(*opts_.main_script, opts_.max_source_size, f.source, why))
      return std::nullopt;
    auto cut = cut_at_main_guard(f.source);
    if (!cut) {
      why = "the main script " + *opts_.main_script +
            " has no `if __name__ == '__main__':` guard, so importing it would run it";
      return std::nullopt;
    }
    f.source = std::move(*cut);
    f.path = *opts_.main_script;
    return f;
  }
  if (opts_.resolver) return resolve(fullname, why);
  auto loc = locate(dirs_, roots_, fullname, why);
  if (!loc) return std::nullopt;
  found f;
  if (!read_file(loc->real, opts_.max_source_size, f.source, why)) return std::nullopt;
  f.path = std::move(loc->path);
  f.file = std::move(loc->real);
  f.is_pkg = loc->is_pkg;
  if (f.is_pkg) f.submodules = submodules_in(fs::path(f.path).parent_path());
  return f;
}

bool module_responder::importable(const std::string& fullname) {
  if (!allowed(opts_, fullname) || excluded_.count(top_of(fullname))) return false;
  if (cache_.count(fullname)) return true;
  std::string ignored;
  if (!opts_.resolver) return locate(dirs_, roots_, fullname, ignored).has_value();
  return resolve(fullname, ignored, false).has_value();
}

module_responder::entry_ptr module_responder::build(const std::string& fullname, found&& f) {
  {
    std::lock_guard lk(mu_);
    ++stats_.builds;
  }
  auto e = std::make_shared<entry>();
  e->found = true;
  e->path = std::move(f.path);
  e->file = std::move(f.file);
  e->is_pkg = f.is_pkg;
  e->submodules = std::move(f.submodules);
  e->size = f.source.size();
  e->hash = hash_of(f.source);
  e->compressed = compress(f.source);
  std::set<std::string> seen;
  for (auto& cand : scan_imports(f.source, fullname, f.is_pkg)) {
    // The candidate and its parents: a child needs the parents to import it.
    for (std::string n = cand; !n.empty(); n = parent_of(n)) {
      if (n == fullname || !seen.insert(n).second) continue;
      if (importable(n)) e->imports.push_back(n);
    }
  }
  return e;
}

module_responder::entry_ptr module_responder::current(const std::string& fullname) {
  auto negative = [&](std::string why) {
    auto e = std::make_shared<entry>();
    e->refusal = std::move(why);
    e->payload = negative_payload(fullname);
    return e;
  };
  if (!allowed(opts_, fullname)) return negative("denied by the allow/deny lists");
  if (excluded_.count(top_of(fullname))) return negative("");
  auto it = cache_.find(fullname);
  std::string why;
  // With a resolver, a module built from a file is served again without asking the
  // resolver (no Python) while the file holds the same content.
  if (opts_.resolver && it != cache_.end() && !it->second->file.empty()) {
    const entry& e = *it->second;
    std::string src, ignored;
    if (read_file(e.file, opts_.max_source_size, src, ignored) && src.size() == e.size && hash_of(src) == e.hash)
      return it->second;
  }
  auto f = find(fullname, why);
  if (!f) {
    if (it != cache_.end()) cache_.erase(it);
    return negative(std::move(why));
  }
  if (it != cache_.end()) {
    const entry& e = *it->second;
    if (e.path == f->path && e.file == f->file && e.is_pkg == f->is_pkg && e.submodules == f->submodules &&
        e.size == f->source.size() && e.hash == hash_of(f->source))
      return it->second;  // same module, same content: the answer built before
  }
  auto e = build(fullname, std::move(*f));
  cache_[fullname] = e;
  return e;
}

std::vector<std::string> module_responder::related_of(const std::string& fullname, const entry& e) {
  // Upstream sends the modules a module imports, directly or not, plus their
  // parents. We follow imports only within the module's own top-level package
  // (those are what gets pushed: see handle()), and list the direct imports from
  // other packages without reading them.
  std::set<std::string> out;
  for (std::string p = parent_of(fullname); !p.empty(); p = parent_of(p)) out.insert(p);
  const std::string top = top_of(fullname);
  std::deque<std::string> todo{fullname};
  std::unordered_set<std::string> visited{fullname};
  while (!todo.empty() && out.size() < max_related) {
    std::string n = std::move(todo.front());
    todo.pop_front();
    entry_ptr en;
    if (n != fullname) {
      en = current(n);
      if (!en->found) continue;
    }
    for (const auto& r : (en ? en->imports : e.imports)) {
      if (r == fullname) continue;
      out.insert(r);
      if (top_of(r) == top && visited.insert(r).second) todo.push_back(r);
    }
  }
  return {out.begin(), out.end()};
}

const std::string& module_responder::payload_of(const std::string& fullname, entry& e) {
  if (!e.payload.empty()) return e.payload;
  wire::value present = wire::none{};
  if (e.is_pkg) {
    wire::list l;
    for (auto& n : e.submodules) l.items.emplace_back(wire::str{n});
    present = std::move(l);
  }
  e.related = related_of(fullname, e);
  wire::list related;
  for (auto& r : e.related) related.items.emplace_back(wire::str{r});
  // 0:fullname 1:pkg_present 2:path 3:compressed 4:related, as upstream.
  e.payload = wire::encode(wire::tuple{{wire::str{fullname}, std::move(present), wire::str{e.path},
                                        wire::blob{e.compressed}, std::move(related)}});
  return e.payload;
}

std::string module_responder::payload_for(const std::string& fullname) {
  auto result = std::make_shared<std::promise<std::string>>();
  auto answer = result->get_future();
  {
    std::lock_guard lk(queue_->mu);
    if (queue_->closed) return negative_payload(fullname);
    queue::job j;
    j.fn = [this, result, fullname] {
      try {
        if (!is_dotted_name(fullname)) {
          result->set_value(negative_payload(fullname));
        } else {
          auto e = current(fullname);
          result->set_value(payload_of(fullname, *e));
        }
      } catch (...) {
        result->set_exception(std::current_exception());
      }
    };
    queue_->jobs.push_back(std::move(j));
  }
  queue_->cv.notify_one();
  return answer.get();
}

void module_responder::send(std::uint32_t context_id, const std::string& fullname, entry& e, bool record) {
  wire::message m;
  m.dst_id = context_id;
  m.handle = wire::LOAD_MODULE;
  m.data = payload_of(fullname, e);
  {
    std::lock_guard lk(mu_);
    stats_.bytes_sent += m.data.size();
    ++(e.found ? stats_.modules_sent : stats_.negatives_sent);
    if (record) sent_[context_id].insert(fullname);
  }
  if (e.found)
    spdlog::debug("mitogen: sending module {} to context {} ({} bytes)", fullname, context_id, m.data.size());
  else
    spdlog::debug("mitogen: context {} asked for module {}, which this program cannot import", context_id, fullname);
  post(std::move(m));
}

void module_responder::post(wire::message m) {
  // Sent from the broker thread, where a stream never blocks: a child that asks
  // and stops reading must not stall the worker, and with it every other child's
  // imports. (Once the broker has stopped, nobody is left to answer.)
  router_->get_broker()->defer([r = router_, m = std::move(m)]() mutable { r->route(std::move(m)); });
}

void module_responder::refuse(std::uint32_t context_id, const std::string& what, const std::string& why) {
  {
    std::lock_guard lk(mu_);
    ++stats_.refused;
  }
  if (warned_.insert(context_id).second) {
    spdlog::warn("mitogen: refused module {} to context {} ({}): {} (further refusals for this context are "
                 "logged at debug level)",
                 what, context_id, router_->name_of(context_id), why);
  } else {
    spdlog::debug("mitogen: refused module {} to context {}: {}", what, context_id, why);
  }
}

void module_responder::forget_gone_contexts() {
  // Context ids are never reused, so the sets of disconnected contexts only cost
  // memory: drop them now and then rather than hooking every disconnect.
  std::lock_guard lk(mu_);
  for (auto it = sent_.begin(); it != sent_.end();) {
    if (router_->stream_for(it->first)) {
      ++it;
    } else {
      warned_.erase(it->first);
      it = sent_.erase(it);
    }
  }
  prune_at_ = std::max<std::size_t>(64, 2 * sent_.size());
}

void module_responder::handle(std::uint32_t ctx, std::uint32_t reply_to, const std::string& name,
                              std::size_t bad_size) {
  {
    std::lock_guard lk(mu_);
    ++stats_.requests;
  }
  // TODO(via=): requests relayed by an intermediary will need the requester's id
  // and the route back; today every requester is a direct child (an intermediary
  // answers its own children from its cache).
  if (bad_size || !is_printable(name)) {
    // Not even a name we could echo: nobody honest sent this. Release a waiter, if any.
    refuse(ctx, "<" + std::to_string(bad_size ? bad_size : name.size()) + " bytes>", "not a module name");
    if (reply_to) post(wire::message::dead(ctx, reply_to, "GET_MODULE refused: not a module name"));
    return;
  }
  if (!is_dotted_name(name)) {
    refuse(ctx, "'" + name + "'", "not a dotted Python name");
    entry neg;
    neg.payload = negative_payload(name);
    send(ctx, name, neg, false);
    return;
  }
  if (sent_.size() >= prune_at_) forget_gone_contexts();
  auto e = current(name);
  if (!e->refusal.empty()) refuse(ctx, "'" + name + "'", e->refusal);
  if (e->found) {
    // As upstream: related modules go first, but only those in the requested
    // top-level package or in one this context already has; the child caches them
    // and imports them without asking. (Only this thread writes sent_.)
    payload_of(name, *e);
    for (const auto& r : e->related) {
      const auto top = top_of(r);
      auto it = sent_.find(ctx);
      const bool has_top = it != sent_.end() && it->second.count(top);
      const bool has_r = it != sent_.end() && it->second.count(r);
      if ((top != name && !has_top) || has_r) continue;
      auto re = current(r);
      if (re->found) send(ctx, r, *re);
    }
  }
  // Answered even if sent before: a child asks only for what it does not have.
  send(ctx, name, *e);
}

}  // namespace mitogen
