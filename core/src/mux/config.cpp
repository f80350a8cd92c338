#include "mitogen/mux/config.hpp"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace mitogen::mux {
namespace {

[[noreturn]] void fail(const std::string& path, const YAML::Mark& mark, const std::string& what) {
  // yaml-cpp counts lines from 0; editors from 1.
  std::string where = path;
  if (!mark.is_null()) where += ":" + std::to_string(mark.line + 1);
  throw config_error(where + ": " + what);
}

std::string scalar_text(const YAML::Node& n) { return n.IsScalar() ? n.Scalar() : std::string("(not a scalar)"); }

/// A non-negative integer, within [lo, hi].
long long integer(const std::string& path, const std::string& key, const YAML::Node& n, long long lo, long long hi,
                  const char* unit) {
  if (!n.IsScalar()) fail(path, n.Mark(), key + ": expected " + std::string(unit) + ", got a " +
                                              (n.IsSequence() ? "list" : n.IsMap() ? "mapping" : "null value"));
  const std::string& s = n.Scalar();
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || errno || !end || *end != '\0')
    fail(path, n.Mark(), key + ": expected " + std::string(unit) + ", got '" + s + "'");
  if (v < lo || v > hi)
    fail(path, n.Mark(), key + ": " + s + " is out of range (" + std::to_string(lo) + " to " + std::to_string(hi) + ")");
  return v;
}

std::string text(const std::string& path, const std::string& key, const YAML::Node& n) {
  if (!n.IsScalar() || n.Scalar().empty()) fail(path, n.Mark(), key + ": expected a non-empty string");
  return n.Scalar();
}

std::string expand_home(const std::string& p) {
  if (p.rfind("~/", 0) != 0) return p;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "") + p.substr(1);
}

}  // namespace

std::string default_config_path() {
  const char* xdg = std::getenv("XDG_CONFIG_HOME");
  std::string base;
  if (xdg && *xdg) {
    base = xdg;
  } else {
    const char* home = std::getenv("HOME");
    base = std::string(home ? home : "") + "/.config";
  }
  return base + "/mitogen-native/mux.yaml";
}

config parse_config(const std::string& source, const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::Load(source);
  } catch (const YAML::Exception& e) {
    fail(path, e.mark, "YAML syntax error: " + e.msg);
  }
  config c;
  if (root.IsNull()) return c;  // an empty file: the defaults
  if (!root.IsMap()) fail(path, root.Mark(), "expected a mapping of settings (key: value lines)");
  for (auto it = root.begin(); it != root.end(); ++it) {
    // Copies: `it->first` lives in a proxy that dies with the expression.
    const YAML::Node k = it->first;
    const YAML::Node v = it->second;
    const std::string key = scalar_text(k);
    if (key == "idle_timeout") {
      c.idle_timeout = std::chrono::seconds(integer(path, key, v, 0, 365LL * 86400, "a number of seconds"));
    } else if (key == "max_contexts") {
      c.max_contexts = static_cast<std::size_t>(integer(path, key, v, 1, 1000000, "a number of contexts"));
    } else if (key == "connect_threads") {
      c.connect_threads = static_cast<std::size_t>(integer(path, key, v, 1, 256, "a number of threads"));
    } else if (key == "log_file") {
      c.log_file = expand_home(text(path, key, v));
    } else if (key == "module_dir") {
      c.module_dir = expand_home(text(path, key, v));
    } else if (key == "log_level") {
      std::string level = text(path, key, v);
      if (level == "warn") level = "warning";
      if (level != "trace" && level != "debug" && level != "info" && level != "warning" && level != "error" &&
          level != "critical" && level != "off")
        fail(path, v.Mark(), key + ": '" + level + "' is not one of trace, debug, info, warning, error, critical, off");
      c.log_level = level;
    } else {
      fail(path, k.Mark(), "unknown key '" + key +
                               "' (known: idle_timeout, max_contexts, log_file, log_level, module_dir, connect_threads)");
    }
  }
  return c;
}

config load_config(const std::string& path, bool must_exist) {
  std::ifstream f(path);
  if (!f) {
    if (errno == ENOENT && !must_exist) return {};
    throw config_error(path + ": cannot read: " + std::strerror(errno));
  }
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_config(ss.str(), path);
}

}  // namespace mitogen::mux
