#include "ssh_config.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>

namespace mitogen::detail {
namespace {

char lower(char c) { return static_cast<char>(std::tolower(static_cast<unsigned char>(c))); }

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return lower(x) == lower(y);
         });
}

/// Split a config line into words: whitespace separates, `=` may separate the
/// keyword, double quotes group.
std::vector<std::string> words(std::string_view line) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (std::isspace(static_cast<unsigned char>(line[i])) || (out.size() == 1 && line[i] == '=')))
      ++i;
    if (i >= line.size()) break;
    if (line[i] == '#') break;
    std::string w;
    if (line[i] == '"') {
      ++i;
      while (i < line.size() && line[i] != '"') w += line[i++];
      ++i;
    } else {
      while (i < line.size() && !std::isspace(static_cast<unsigned char>(line[i])) &&
             !(out.empty() && line[i] == '='))
        w += line[i++];
    }
    out.push_back(std::move(w));
  }
  return out;
}

bool host_matches(const std::vector<std::string>& w, std::string_view host) {
  bool any = false;
  for (std::size_t i = 1; i < w.size(); ++i) {
    std::string_view p = w[i];
    bool negate = !p.empty() && p[0] == '!';
    if (negate) p.remove_prefix(1);
    if (ssh_pattern_match(p, host)) {
      if (negate) return false;
      any = true;
    }
  }
  return any;
}

}  // namespace

bool ssh_pattern_match(std::string_view p, std::string_view s) {
  // Iterative glob with backtracking to the last '*'.
  std::size_t pi = 0, si = 0, star = std::string_view::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && (p[pi] == '?' || lower(p[pi]) == lower(s[si]))) {
      ++pi;
      ++si;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (star != std::string_view::npos) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

ssh_host_config parse_ssh_config(std::string_view text, std::string_view host) {
  ssh_host_config c;
  bool active = true;  // lines before the first Host apply to every host
  while (!text.empty()) {
    auto nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    auto w = words(line);
    if (w.empty()) continue;
    const std::string& key = w[0];
    if (iequals(key, "Host")) {
      active = host_matches(w, host);
      continue;
    }
    if (iequals(key, "Match")) {
      active = w.size() == 2 && iequals(w[1], "all");
      continue;
    }
    if (!active || w.size() < 2) continue;
    const std::string& v = w[1];
    if (iequals(key, "HostName")) {
      if (!c.hostname) {
        std::string h;
        for (std::size_t i = 0; i < v.size(); ++i) {
          if (v[i] == '%' && i + 1 < v.size() && v[i + 1] == 'h') {
            h += host;
            ++i;
          } else if (v[i] == '%' && i + 1 < v.size() && v[i + 1] == '%') {
            h += '%';
            ++i;
          } else {
            h += v[i];
          }
        }
        c.hostname = h;
      }
    } else if (iequals(key, "User")) {
      if (!c.user) c.user = v;
    } else if (iequals(key, "Port")) {
      unsigned p = 0;
      auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), p);
      if (!c.port && ec == std::errc{} && ptr == v.data() + v.size() && p > 0 && p < 65536)
        c.port = static_cast<std::uint16_t>(p);
    } else if (iequals(key, "IdentityFile")) {
      if (std::find(c.identity_files.begin(), c.identity_files.end(), v) == c.identity_files.end())
        c.identity_files.push_back(v);
    }
  }
  return c;
}

std::string expand_ssh_path(std::string_view path, const std::string& home, const std::string& local_user,
                            const std::string& host, const std::string& remote_user, std::uint16_t port) {
  std::string out;
  std::size_t i = 0;
  if (path.size() >= 1 && path[0] == '~' && (path.size() == 1 || path[1] == '/')) {
    out = home;
    i = 1;
  }
  for (; i < path.size(); ++i) {
    if (path[i] != '%' || i + 1 >= path.size()) {
      out += path[i];
      continue;
    }
    switch (path[++i]) {
      case 'd': out += home; break;
      case 'u': out += local_user; break;
      case 'h': out += host; break;
      case 'r': out += remote_user; break;
      case 'p': out += std::to_string(port); break;
      case '%': out += '%'; break;
      default: out += '%'; out += path[i];
    }
  }
  return out;
}

}  // namespace mitogen::detail
