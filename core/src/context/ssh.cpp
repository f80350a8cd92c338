#include "mitogen/context/ssh.hpp"

#include <pwd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "bootstrap.hpp"
#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "process.hpp"
#include "ssh_config.hpp"
#include "ssh_session.hpp"
#include "via.hpp"

namespace mitogen {
namespace {

using detail::sh_quote;

/// The command the remote login shell runs. The stage 1 one-liner is base64 inside a
/// `-c` argument, so it survives any quoting; the name after it puts
/// "mitogen:<remote_name>" on the remote command line (ps, pgrep -f).
std::string remote_command(const connect_options& o, const std::string& remote_name) {
  const std::string tail = " -c " + sh_quote(detail::stage1_oneliner()) + " " + sh_quote("mitogen:" + remote_name);
  if (!o.python_path.empty()) {
    std::string cmd;
    for (const auto& a : o.python_path) cmd += (cmd.empty() ? "" : " ") + sh_quote(a);
    return cmd + tail;
  }
  // Interpreter discovery: the first of these that exists (POSIX shell syntax).
  return "for p in python3 /usr/bin/python3 python; do command -v \"$p\" >/dev/null 2>&1 && exec \"$p\"" + tail +
         "; done; echo \"mitogen: no python3 or python on $(hostname)\" >&2; exit 127";
}

struct local_identity {
  std::string user = "unknown";
  std::string home;
};

local_identity whoami() {
  local_identity me;
  // getpwuid_r: ssh() may run on many threads at once (TSan caught getpwuid's
  // shared static buffer).
  passwd pwd{}, *pw = nullptr;
  char buf[4096];
  if (::getpwuid_r(::getuid(), &pwd, buf, sizeof buf, &pw) == 0 && pw) {
    me.user = pw->pw_name;
    me.home = pw->pw_dir ? pw->pw_dir : "";
  }
  if (const char* h = std::getenv("HOME"); h && *h) me.home = h;
  return me;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool contains(const std::string& hay, std::string_view needle) { return hay.find(needle) != std::string::npos; }

/// OpenSSH says what went wrong only on stderr; turn its words into our codes.
std::error_code classify_openssh(std::error_code ec, const std::string& err) {
  if (ec == connect_errc::connect_timeout) return ec;
  if (contains(err, "Permission denied")) return make_error_code(connect_errc::auth_failed);
  if (contains(err, "HAS CHANGED") || contains(err, "Host key for") || contains(err, "host key has changed"))
    return make_error_code(connect_errc::host_key_mismatch);
  if (contains(err, "Host key verification failed")) return make_error_code(connect_errc::host_key_unknown);
  for (const char* s : {"Connection refused", "Connection timed out", "No route to host", "Could not resolve hostname",
                        "Network is unreachable", "Connection closed by", "Connection reset by"})
    if (contains(err, s)) return make_error_code(connect_errc::host_unreachable);
  return ec;
}

std::vector<std::string> openssh_argv(const ssh_options& o, const std::string& command) {
  std::vector<std::string> a = {o.ssh_path, "-o", "LogLevel=ERROR", "-o", "BatchMode=yes"};
  auto opt = [&](const std::string& kv) {
    a.push_back("-o");
    a.push_back(kv);
  };
  if (o.ssh_config_file) {
    a.push_back("-F");
    a.push_back(o.ssh_config_file->empty() ? "/dev/null" : *o.ssh_config_file);
  }
  if (o.username) {
    a.push_back("-l");
    a.push_back(*o.username);
  }
  if (o.port) {
    a.push_back("-p");
    a.push_back(std::to_string(*o.port));
  }
  for (const auto& f : o.identity_files) {
    a.push_back("-i");
    a.push_back(f);
  }
  if (!o.identity_files.empty()) opt("IdentitiesOnly=yes");
  if (!o.use_agent)
    opt("IdentityAgent=none");
  else if (o.agent_socket)
    opt("IdentityAgent=" + *o.agent_socket);
  switch (o.check_host_keys) {
    case host_key_policy::enforce: opt("StrictHostKeyChecking=yes"); break;
    case host_key_policy::accept: opt("StrictHostKeyChecking=accept-new"); break;
    case host_key_policy::ignore:
      opt("StrictHostKeyChecking=no");
      opt("UserKnownHostsFile=/dev/null");
      opt("GlobalKnownHostsFile=/dev/null");
      break;
  }
  if (o.known_hosts_file && o.check_host_keys != host_key_policy::ignore) opt("UserKnownHostsFile=" + *o.known_hosts_file);
  auto secs = std::chrono::ceil<std::chrono::seconds>(o.connect_timeout).count();
  opt("ConnectTimeout=" + std::to_string(std::max<long long>(1, secs)));
  if (o.keepalive_interval.count() > 0) {
    opt("ServerAliveInterval=" + std::to_string(o.keepalive_interval.count()));
    opt("ServerAliveCountMax=" + std::to_string(o.keepalive_count));
  }
  if (o.compression) opt("Compression=yes");
  a.insert(a.end(), o.ssh_args.begin(), o.ssh_args.end());
  a.push_back(o.hostname);
  a.push_back(command);
  return a;
}

}  // namespace

namespace {

/// ssh() through another context: its agent runs the system ssh client (the openssh
/// transport's options; see docs/via.md).
context ssh_via(router& r, const ssh_options& o) {
  if (o.password)
    throw error("mitogen: ssh(via=...): password authentication is not available through another context (use "
                "keys or an agent)");
  wire::dict d;
  auto put = [&](const char* k, wire::value v) { d.items.emplace_back(wire::str{k}, std::move(v)); };
  put("hostname", wire::str{o.hostname});
  if (o.port) put("port", static_cast<std::int64_t>(*o.port));
  if (o.username) put("username", wire::str{*o.username});
  wire::list ids;
  for (auto& f : o.identity_files) ids.items.emplace_back(wire::str{f});
  put("identity_files", std::move(ids));
  put("use_agent", o.use_agent);
  put("check_host_keys", wire::str{o.check_host_keys == host_key_policy::enforce  ? "enforce"
                                   : o.check_host_keys == host_key_policy::accept ? "accept"
                                                                                   : "ignore"});
  if (o.known_hosts_file) put("known_hosts_file", wire::str{*o.known_hosts_file});
  if (o.ssh_config_file) put("ssh_config_file", wire::str{*o.ssh_config_file});
  put("keepalive_interval", static_cast<std::int64_t>(o.keepalive_interval.count()));
  put("keepalive_count", static_cast<std::int64_t>(o.keepalive_count));
  put("ssh_path", wire::str{o.ssh_path});
  wire::list args;
  for (auto& a : o.ssh_args) args.items.emplace_back(wire::str{a});
  put("ssh_args", std::move(args));
  return detail::connect_via(r, o, "ssh", std::move(d), classify_openssh);
}

}  // namespace

context ssh(router& r, const ssh_options& o) {
  if (o.hostname.empty()) throw error("mitogen: ssh() needs a hostname");
  if (o.via) return ssh_via(r, o);
  detail::check_can_connect(r, "ssh");
  auto b = r.get_broker();
  const local_identity me = whoami();
  const std::string remote_name = o.remote_name.value_or(default_remote_name());
  const std::string command = remote_command(o, remote_name);

  detail::boot_request req;
  req.remote_name = remote_name;
  req.opts = &o;
  req.boot = std::make_shared<detail::boot_state>();

  if (o.transport == ssh_transport::openssh) {
    if (o.password)
      throw error("mitogen: ssh(): password authentication needs transport libssh2 (OpenSSH reads passwords "
                  "from a terminal only)");
    req.name = "ssh." + o.hostname + (o.port && *o.port != 22 ? ":" + std::to_string(*o.port) : "");
    auto argv = openssh_argv(o, command);
    detail::spawned child;
    if (auto ec = detail::spawn_piped(argv, o.ssh_path, child))
      throw stream_error(make_error_code(connect_errc::spawn_failed), "mitogen: cannot start " + o.ssh_path + ": " + ec.message());
    detail::start_stderr_reader(b->io(), child.stderr_r, req.boot, req.name);
    req.id = r.allocate_id();
    req.s = stream::create(b, child.stdout_r, child.stdin_w,
                           {.name = req.name, .max_message_size = o.max_message_size, .leader_reads = true});
    req.teardown = [b, pid = child.pid](std::function<void()> done) {
      detail::reap_child(b, pid, std::chrono::milliseconds(1000), std::move(done));
    };
    req.classify = classify_openssh;
    return detail::run_bootstrap(r, std::move(req));
  }

  // libssh2: options, then ~/.ssh/config, then defaults.
  detail::ssh_host_config cfg;
  const std::string cfg_path = o.ssh_config_file.value_or(me.home + "/.ssh/config");
  if (!cfg_path.empty()) cfg = detail::parse_ssh_config(read_file(cfg_path), o.hostname);
  detail::ssh_target t;
  t.host = cfg.hostname.value_or(o.hostname);
  t.port = o.port ? *o.port : cfg.port.value_or(22);
  t.user = o.username ? *o.username : cfg.user.value_or(me.user);
  t.password = o.password;
  std::vector<std::string> ids = o.identity_files;
  if (ids.empty()) ids = cfg.identity_files;
  if (ids.empty()) ids = {"~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"};
  for (const auto& f : ids) t.identity_files.push_back(detail::expand_ssh_path(f, me.home, me.user, t.host, t.user, t.port));
  t.use_agent = o.use_agent;
  t.agent_socket = o.agent_socket;
  t.policy = o.check_host_keys;
  t.known_hosts_file = o.known_hosts_file.value_or(me.home + "/.ssh/known_hosts");
  t.keepalive_interval = o.keepalive_interval;
  t.keepalive_count = o.keepalive_count;
  t.compression = o.compression;
  t.command = command;
  t.name = req.name = "ssh." + o.hostname + (t.port != 22 ? ":" + std::to_string(t.port) : "");

  // The bridge: the stream frames over one end, the SSH channel pumps the other.
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sp) != 0)
    throw stream_error(make_error_code(connect_errc::spawn_failed), "mitogen: socketpair failed");
  for (int fd : sp) {
    int sz = 1 << 20;
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
  }
  req.id = r.allocate_id();
  req.s = stream::create(b, sp[0], sp[0],
                         {.name = req.name, .max_message_size = o.max_message_size, .leader_reads = true});
  auto session = detail::start_ssh_session(b, std::move(t), sp[1], req.boot);
  req.teardown = [session](std::function<void()> done) {
    detail::close_ssh_session(session);
    done();
  };
  return detail::run_bootstrap(r, std::move(req));
}

}  // namespace mitogen
