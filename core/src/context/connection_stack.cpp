#include "mitogen/context/connection_stack.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string_view>

namespace mitogen {
namespace {

// Python logging levels the Python API derives from debug=.
constexpr int log_debug = 10;
constexpr int log_info = 20;

/// The keyword arguments of each method of the Python API's Router
/// (plugin/mitogen_native/master.py), `via` excepted.
const std::map<std::string, std::set<std::string>>& allowed_keys() {
  static const auto* keys = new std::map<std::string, std::set<std::string>>{
      {"local", {"remote_name", "python_path", "debug", "connect_timeout", "name"}},
      {"ssh",
       {"hostname", "port", "username", "password", "identity_file", "check_host_keys", "known_hosts_file",
        "connect_timeout", "keepalive_interval", "python_path", "remote_name", "transport", "ssh_path", "ssh_args",
        "ssh_config_file", "debug", "name"}},
      {"sudo",
       {"username", "sudo_path", "password", "sudo_args", "preserve_env", "set_home", "login", "selinux_role",
        "selinux_type", "password_prompts", "incorrect_prompts", "not_allowed_prompts", "python_path", "remote_name",
        "connect_timeout", "debug", "name"}},
      {"su",
       {"username", "password", "su_path", "password_prompt", "incorrect_prompts", "password_prompts",
        "not_allowed_prompts", "python_path", "remote_name", "connect_timeout", "debug", "name"}},
      {"doas",
       {"username", "password", "doas_path", "password_prompt", "incorrect_prompts", "password_prompts",
        "not_allowed_prompts", "python_path", "remote_name", "connect_timeout", "debug", "name"}},
  };
  return *keys;
}

/// Reads the values of one hop dict, with error messages that say where.
class hop_reader {
 public:
  hop_reader(std::size_t index, std::string method) : index_(index), method_(std::move(method)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& why) const {
    throw stack_error("connection stack: hop " + std::to_string(index_) + " (" + method_ + "): " + key + ": " + why);
  }

  static bool is_none(const wire::value& v) { return v.is<wire::none>(); }

  std::string text(const std::string& key, const wire::value& v) const {
    if (v.is<wire::str>()) return v.as<wire::str>().utf8;
    fail(key, "expected a string, got " + wire::describe(v));
  }

  /// A password: str, Secret or UTF-8 bytes. Never echoed in errors.
  std::string secret(const std::string& key, const wire::value& v) const {
    if (v.is<wire::secret>()) return v.as<wire::secret>().utf8;
    if (v.is<wire::str>()) return v.as<wire::str>().utf8;
    if (v.is<wire::bytes>()) return v.as<wire::bytes>().data;
    fail(key, "expected a string or mitogen.core.Secret, got " + wire::describe(v));
  }

  bool flag(const std::string& key, const wire::value& v) const {
    if (v.is<bool>()) return v.as<bool>();
    if (v.is<std::int64_t>() && (v.as<std::int64_t>() == 0 || v.as<std::int64_t>() == 1))
      return v.as<std::int64_t>() == 1;
    fail(key, "expected True or False, got " + wire::describe(v));
  }

  std::int64_t integer(const std::string& key, const wire::value& v, std::int64_t lo, std::int64_t hi) const {
    std::int64_t n = 0;
    if (v.is<std::int64_t>()) {
      n = v.as<std::int64_t>();
    } else if (v.is<wire::str>() && !v.as<wire::str>().utf8.empty() && v.as<wire::str>().utf8.size() <= 18 &&
               std::all_of(v.as<wire::str>().utf8.begin(), v.as<wire::str>().utf8.end(),
                           [](char c) { return c >= '0' && c <= '9'; })) {
      n = std::stoll(v.as<wire::str>().utf8);
    } else {
      fail(key, "expected an integer, got " + wire::describe(v));
    }
    if (n < lo || n > hi) fail(key, std::to_string(n) + " is out of range " + std::to_string(lo) + ".." + std::to_string(hi));
    return n;
  }

  /// Seconds as an int or float (the Python API's timeouts).
  std::chrono::milliseconds seconds(const std::string& key, const wire::value& v) const {
    double s = 0;
    if (v.is<std::int64_t>())
      s = static_cast<double>(v.as<std::int64_t>());
    else if (v.is<double>())
      s = v.as<double>();
    else
      fail(key, "expected a number of seconds, got " + wire::describe(v));
    if (!std::isfinite(s) || s < 0 || s > 86400.0 * 365) fail(key, "not a usable number of seconds");
    return std::chrono::milliseconds(static_cast<std::int64_t>(s * 1000.0));
  }

  /// A list of strings; a single string is one item, or split on whitespace.
  std::vector<std::string> strings(const std::string& key, const wire::value& v, bool split = false) const {
    std::vector<std::string> out;
    if (v.is<wire::str>()) {
      const auto& s = v.as<wire::str>().utf8;
      if (!split) return {s};
      std::size_t i = 0;
      while (i < s.size()) {
        while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
        std::size_t j = i;
        while (j < s.size() && !std::isspace(static_cast<unsigned char>(s[j]))) ++j;
        if (j > i) out.push_back(s.substr(i, j - i));
        i = j;
      }
      return out;
    }
    const std::vector<wire::value>* items = nullptr;
    if (v.is<wire::list>()) items = &v.as<wire::list>().items;
    if (v.is<wire::tuple>()) items = &v.as<wire::tuple>().items;
    if (!items) fail(key, "expected a string or a list of strings, got " + wire::describe(v));
    for (std::size_t i = 0; i < items->size(); ++i) {
      const auto& it = (*items)[i];
      if (!it.is<wire::str>()) fail(key + "[" + std::to_string(i) + "]", "expected a string, got " + wire::describe(it));
      out.push_back(it.as<wire::str>().utf8);
    }
    return out;
  }

 private:
  std::size_t index_;
  std::string method_;
};

using key_fn = std::function<void(const std::string& key, const wire::value& v)>;

/// Call `fn` for each key of `d` that is not None, after checking every key is one
/// the method takes.
void for_each_option(const hop_reader& rd, const std::string& method, const wire::dict& d, const key_fn& fn) {
  const auto& allowed = allowed_keys().at(method);
  std::set<std::string> seen;
  for (const auto& [k, v] : d.items) {
    if (!k.is<wire::str>()) rd.fail("(key)", "keys must be strings, got " + wire::describe(k));
    const std::string& key = k.as<wire::str>().utf8;
    if (key == "method") continue;
    if (!seen.insert(key).second) rd.fail(key, "given twice");
    if (key == "via")
      rd.fail(key, "not allowed in a stack (the previous hop is the via)");
    if (!allowed.count(key)) rd.fail(key, "unknown option of " + method + "()");
    if (hop_reader::is_none(v)) continue;  // None = not given, as in the Python API
    fn(key, v);
  }
}

/// The options every method shares; true if `key` was one of them.
bool common_option(const hop_reader& rd, connect_options& o, const std::string& key, const wire::value& v) {
  if (key == "python_path") {
    o.python_path = rd.strings(key, v);
  } else if (key == "remote_name") {
    o.remote_name = rd.text(key, v);
  } else if (key == "connect_timeout") {
    o.connect_timeout = rd.seconds(key, v);
  } else if (key == "debug") {
    o.debug = rd.flag(key, v);
    o.log_level = o.debug ? log_debug : log_info;
  } else if (key == "name") {
    rd.text(key, v);  // checked, then ignored: a shared context keeps the daemon's name
  } else {
    return false;
  }
  return true;
}

/// sudo/su/doas options shared by the three.
bool become_option(const hop_reader& rd, become_options& o, const std::string& key, const wire::value& v) {
  if (common_option(rd, o, key, v)) return true;
  if (key == "username") {
    o.username = rd.text(key, v);
  } else if (key == "password") {
    o.password = rd.secret(key, v);
  } else if (key == "password_prompt" || key == "password_prompts") {
    for (auto& p : rd.strings(key, v)) o.password_prompts.push_back(std::move(p));
  } else if (key == "incorrect_prompts") {
    o.incorrect_prompts = rd.strings(key, v);
  } else if (key == "not_allowed_prompts") {
    o.not_allowed_prompts = rd.strings(key, v);
  } else {
    return false;
  }
  return true;
}

const char* policy_name(host_key_policy p) {
  switch (p) {
    case host_key_policy::enforce: return "enforce";
    case host_key_policy::accept: return "accept";
    case host_key_policy::ignore: return "ignore";
  }
  return "?";
}

/// SipHash-2-4 of `data` under `k0`/`k1`: a keyed hash, so that a key can tell
/// passwords apart without holding anything a dictionary attack could use.
std::uint64_t siphash(std::uint64_t k0, std::uint64_t k1, std::string_view data) {
  auto rotl = [](std::uint64_t x, int b) { return (x << b) | (x >> (64 - b)); };
  std::uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
  std::uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
  auto round = [&] {
    v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32);
    v2 += v3; v3 = rotl(v3, 16); v3 ^= v2;
    v0 += v3; v3 = rotl(v3, 21); v3 ^= v0;
    v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32);
  };
  const std::size_t n = data.size();
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t m = 0;
    for (int b = 0; b < 8; ++b) m |= static_cast<std::uint64_t>(static_cast<unsigned char>(data[i + b])) << (8 * b);
    v3 ^= m;
    round();
    round();
    v0 ^= m;
  }
  std::uint64_t last = static_cast<std::uint64_t>(n & 0xff) << 56;
  for (int b = 0; i + b < n; ++b) last |= static_cast<std::uint64_t>(static_cast<unsigned char>(data[i + b])) << (8 * b);
  v3 ^= last;
  round();
  round();
  v0 ^= last;
  v2 ^= 0xff;
  for (int r = 0; r < 4; ++r) round();
  return v0 ^ v1 ^ v2 ^ v3;
}

/// 128 bits of a keyed hash of a secret (a password, an environment), as hex. The
/// key is random, made once per process: tags compare equal within one daemon,
/// and mean nothing outside it.
std::string secret_tag(const std::string& password) {
  static const std::array<std::uint64_t, 4> k = [] {
    std::array<std::uint64_t, 4> out{};
    std::random_device rd;
    for (auto& x : out) x = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    return out;
  }();
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(siphash(k[0], k[1], password)),
                static_cast<unsigned long long>(siphash(k[2], k[3], password)));
  return buf;
}

/// Builds a key: fields as "name=<len>:<bytes>;" so that no value can look like
/// another field or hop.
class key_builder {
 public:
  explicit key_builder(const std::string& method) { field("method", method); }
  void field(const char* name, const std::string& v) {
    out_ += name;
    out_ += '=';
    out_ += std::to_string(v.size());
    out_ += ':';
    out_ += v;
    out_ += ';';
  }
  void field(const char* name, const std::optional<std::string>& v) {
    if (v) field(name, *v);
  }
  void field(const char* name, const std::vector<std::string>& v) {
    std::string joined;
    for (const auto& s : v) joined += std::to_string(s.size()) + ":" + s;
    field(name, "[" + joined + "]");
  }
  void field(const char* name, bool v) { field(name, std::string(v ? "1" : "0")); }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace

hop parse_hop(const wire::value& v, std::size_t index) {
  hop_reader outer(index, "?");
  if (!v.is<wire::dict>()) outer.fail("(hop)", "expected a dict, got " + wire::describe(v));
  const auto& d = v.as<wire::dict>();
  const wire::value* m = nullptr;
  for (const auto& [k, val] : d.items)
    if (k.is<wire::str>() && k.as<wire::str>().utf8 == "method") m = &val;
  if (!m) outer.fail("method", "missing");
  const std::string method = outer.text("method", *m);
  hop_reader rd(index, method);
  if (!allowed_keys().count(method)) rd.fail("method", "unknown connection method '" + method + "' (local, ssh, sudo, su, doas)");

  hop h;
  h.method = method;
  if (method == "local") {
    local_options o;
    for_each_option(rd, method, d, [&](const std::string& key, const wire::value& val) {
      if (!common_option(rd, o, key, val)) rd.fail(key, "unhandled option");
    });
    h.options = std::move(o);
  } else if (method == "ssh") {
    ssh_options o;
    for_each_option(rd, method, d, [&](const std::string& key, const wire::value& val) {
      if (common_option(rd, o, key, val)) return;
      if (key == "hostname") o.hostname = rd.text(key, val);
      else if (key == "port") o.port = static_cast<std::uint16_t>(rd.integer(key, val, 1, 65535));
      else if (key == "username") o.username = rd.text(key, val);
      else if (key == "password") o.password = rd.secret(key, val);
      else if (key == "identity_file") o.identity_files = rd.strings(key, val);
      else if (key == "known_hosts_file") o.known_hosts_file = rd.text(key, val);
      else if (key == "ssh_config_file") o.ssh_config_file = rd.text(key, val);
      else if (key == "ssh_path") o.ssh_path = rd.text(key, val);
      else if (key == "ssh_args") o.ssh_args = rd.strings(key, val);
      else if (key == "keepalive_interval")
        o.keepalive_interval = std::chrono::duration_cast<std::chrono::seconds>(rd.seconds(key, val));
      else if (key == "check_host_keys") {
        auto p = rd.text(key, val);
        if (p == "enforce") o.check_host_keys = host_key_policy::enforce;
        else if (p == "accept") o.check_host_keys = host_key_policy::accept;
        else if (p == "ignore") o.check_host_keys = host_key_policy::ignore;
        else rd.fail(key, "must be 'enforce', 'accept' or 'ignore', not '" + p + "'");
      } else if (key == "transport") {
        auto t = rd.text(key, val);
        if (t == "libssh2") o.transport = ssh_transport::libssh2;
        else if (t == "openssh") o.transport = ssh_transport::openssh;
        else rd.fail(key, "must be 'libssh2' or 'openssh', not '" + t + "'");
      } else {
        rd.fail(key, "unhandled option");
      }
    });
    if (o.hostname.empty()) rd.fail("hostname", "missing");
    h.options = std::move(o);
  } else if (method == "sudo") {
    sudo_options o;
    for_each_option(rd, method, d, [&](const std::string& key, const wire::value& val) {
      if (become_option(rd, o, key, val)) return;
      if (key == "sudo_path") o.sudo_path = rd.text(key, val);
      else if (key == "sudo_args") o.sudo_args = rd.strings(key, val, /*split=*/true);
      else if (key == "preserve_env") o.preserve_env = rd.flag(key, val);
      else if (key == "set_home") o.set_home = rd.flag(key, val);
      else if (key == "login") o.login = rd.flag(key, val);
      else if (key == "selinux_role") o.selinux_role = rd.text(key, val);
      else if (key == "selinux_type") o.selinux_type = rd.text(key, val);
      else rd.fail(key, "unhandled option");
    });
    h.options = std::move(o);
  } else if (method == "su") {
    su_options o;
    for_each_option(rd, method, d, [&](const std::string& key, const wire::value& val) {
      if (become_option(rd, o, key, val)) return;
      if (key == "su_path") o.su_path = rd.text(key, val);
      else rd.fail(key, "unhandled option");
    });
    h.options = std::move(o);
  } else {
    doas_options o;
    for_each_option(rd, method, d, [&](const std::string& key, const wire::value& val) {
      if (become_option(rd, o, key, val)) return;
      if (key == "doas_path") o.doas_path = rd.text(key, val);
      else rd.fail(key, "unhandled option");
    });
    h.options = std::move(o);
  }
  return h;
}

connection_stack parse_connection_stack(const wire::value& v) {
  const std::vector<wire::value>* items = nullptr;
  if (v.is<wire::list>()) items = &v.as<wire::list>().items;
  if (v.is<wire::tuple>()) items = &v.as<wire::tuple>().items;
  if (!items) throw stack_error("connection stack: expected a list of hop dicts, got " + wire::describe(v));
  if (items->empty()) throw stack_error("connection stack: empty");
  // Far deeper than any real chain of hops; bounds what one request can ask for.
  if (items->size() > 16) throw stack_error("connection stack: more than 16 hops");
  connection_stack s;
  s.reserve(items->size());
  for (std::size_t i = 0; i < items->size(); ++i) s.push_back(parse_hop((*items)[i], i));
  return s;
}

std::string hop_key(const hop& h) {
  key_builder k(h.method);
  std::visit(
      [&](const auto& o) {
        using T = std::decay_t<decltype(o)>;
        k.field("python_path", o.python_path);
        if constexpr (!std::is_same_v<T, local_options>) {
          // A context made with one password is not handed to whoever gives another
          // one, or none: the attempt is made (and fails, as it would without us).
          if (o.password) k.field("password", secret_tag(*o.password));
        } else if (o.environment) {
          // Another environment is another context (its programs would see it).
          std::vector<std::string> env = *o.environment;
          std::sort(env.begin(), env.end());
          std::string joined;
          for (const auto& e : env) joined.append(e).push_back('\0');
          k.field("environment", secret_tag(joined));
        }
        if constexpr (std::is_same_v<T, ssh_options>) {
          k.field("hostname", o.hostname);
          if (o.port) k.field("port", std::to_string(*o.port));
          k.field("username", o.username);
          k.field("identity_files", o.identity_files);
          k.field("transport", std::string(o.transport == ssh_transport::openssh ? "openssh" : "libssh2"));
          k.field("check_host_keys", std::string(policy_name(o.check_host_keys)));
          k.field("known_hosts_file", o.known_hosts_file);
          k.field("ssh_config_file", o.ssh_config_file);
          if (o.transport == ssh_transport::openssh) {
            k.field("ssh_path", o.ssh_path);
            k.field("ssh_args", o.ssh_args);
          }
        } else if constexpr (std::is_base_of_v<become_options, T>) {
          k.field("username", o.username.value_or("root"));
          if constexpr (std::is_same_v<T, sudo_options>) {
            k.field("sudo_path", o.sudo_path);
            k.field("sudo_args", o.sudo_args);
            k.field("preserve_env", o.preserve_env);
            k.field("set_home", o.set_home);
            k.field("login", o.login);
            k.field("selinux_role", o.selinux_role);
            k.field("selinux_type", o.selinux_type);
          } else if constexpr (std::is_same_v<T, su_options>) {
            k.field("su_path", o.su_path);
          } else {
            k.field("doas_path", o.doas_path);
          }
        }
      },
      h.options);
  return k.take();
}

std::string stack_key(const connection_stack& s, std::size_t n) {
  std::string out;
  n = std::min(n, s.size());
  for (std::size_t i = 0; i < n; ++i) {
    std::string k = hop_key(s[i]);
    out += std::to_string(k.size()) + "{" + k + "}";
  }
  return out;
}

std::string describe_hop(const hop& h) {
  return std::visit(
      [&](const auto& o) -> std::string {
        using T = std::decay_t<decltype(o)>;
        std::string d = h.method;
        if constexpr (std::is_same_v<T, ssh_options>) {
          if (o.transport == ssh_transport::openssh) d += "(openssh)";
          d += " ";
          if (o.username) d += *o.username + "@";
          d += o.hostname;
          if (o.port) d += ":" + std::to_string(*o.port);
        } else if constexpr (std::is_base_of_v<become_options, T>) {
          d += " " + o.username.value_or("root");
        }
        if (!o.python_path.empty()) {
          std::string py;
          for (const auto& a : o.python_path) py += (py.empty() ? "" : " ") + a;
          d += " (" + py + ")";
        }
        return d;
      },
      h.options);
}

std::string describe_stack(const connection_stack& s, std::size_t n) {
  std::string out;
  n = std::min(n, s.size());
  for (std::size_t i = 0; i < n; ++i) out += (i ? " -> " : "") + describe_hop(s[i]);
  return out;
}

context connect_hop(router& r, const hop& h, const std::optional<context>& via) {
  return std::visit(
      [&](auto o) -> context {
        using T = std::decay_t<decltype(o)>;
        o.via = via;
        if constexpr (std::is_same_v<T, local_options>) return local(r, o);
        else if constexpr (std::is_same_v<T, ssh_options>) return ssh(r, o);
        else if constexpr (std::is_same_v<T, sudo_options>) return sudo(r, o);
        else if constexpr (std::is_same_v<T, su_options>) return su(r, o);
        else return doas(r, o);
      },
      h.options);
}

}  // namespace mitogen
