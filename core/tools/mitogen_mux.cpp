// mitogen-mux: the multiplexer daemon of mitogen-native and its control commands.
//
//   mitogen-mux serve [--detach] [--socket PATH]   run the daemon
//   mitogen-mux status [--json] [--socket PATH]    list its contexts
//   mitogen-mux stop [--socket PATH]               end it (its contexts shut down)
//   mitogen-mux path                               print the socket path
//
// docs/ansible.md, "The multiplexer daemon".
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "mitogen/errors.hpp"
#include "mitogen/mux/client.hpp"
#include "mitogen/mux/config.hpp"
#include "mitogen/mux/daemon.hpp"
#include "mitogen/mux/paths.hpp"

#ifndef MITOGEN_MUX_DEFAULT_MODULE_DIR
#define MITOGEN_MUX_DEFAULT_MODULE_DIR ""
#endif

namespace {

namespace fs = std::filesystem;
using namespace mitogen;

/// Exit statuses.
constexpr int exit_ok = 0;
constexpr int exit_error = 1;
constexpr int exit_config = 2;
constexpr int exit_running = 3;      ///< serve: another daemon holds the lock
constexpr int exit_not_running = 4;  ///< status: no daemon

std::string install_dir();

void usage(std::ostream& o) {
  o << "usage: mitogen-mux serve [--detach] [--socket PATH]\n"
       "       mitogen-mux status [--json] [--socket PATH]\n"
       "       mitogen-mux stop [--socket PATH]\n"
       "       mitogen-mux path [--socket PATH]\n"
       "\n"
       "The multiplexer daemon of mitogen-native: keeps the contexts (connections and\n"
       "remote agents) of this user for the Ansible plugins. Settings: $"
    << mux::config_env << " or " << mux::default_config_path()
    << ".\nSocket: $" << mux::socket_env << " or " << mux::default_socket_path(install_dir())
    << ".\n"
       "Exit status: 0 ok, 1 error, 2 bad settings file, 3 (serve) already running,\n"
       "4 (status) not running.\n";
}

struct args {
  std::string command;
  std::string socket;
  bool detach = false;
  bool json = false;
};

/// The installation this program belongs to: the directory holding the
/// mitogen_native package it sits in (<dir>/mitogen_native/bin/mitogen-mux), else
/// the one the build installs the package into.
std::string install_dir() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    fs::path dir = exe.parent_path();  // .../mitogen_native/bin
    if (dir.filename() == "bin" && dir.parent_path().filename() == "mitogen_native")
      return dir.parent_path().parent_path().string();
  }
  return MITOGEN_MUX_DEFAULT_MODULE_DIR;
}

/// Where mitogen_native_target.py is: $MITOGEN_MUX_MODULE_DIR, the settings file,
/// else beside the package (install_dir()).
std::string module_dir(const mux::config& cfg) {
  if (const char* e = std::getenv(mux::module_dir_env); e && *e) return e;
  if (!cfg.module_dir.empty()) return cfg.module_dir;
  return install_dir();
}

mux::config load_settings() {
  const char* env = std::getenv(mux::config_env);
  const std::string path = env && *env ? env : mux::default_config_path();
  return mux::load_config(path, env && *env);
}

void setup_logging(const mux::config& cfg, bool to_stderr) {
  const std::string path = cfg.log_file.empty() ? mux::default_log_path() : cfg.log_file;
  // Ours alone to read, whatever the umask (spdlog would create it 0666 & ~umask).
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw std::runtime_error(path + ": " + std::strerror(errno));
  ::close(fd);
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::rotating_file_sink_mt>(path, 10u << 20, 3));
  if (to_stderr) sinks.push_back(std::make_shared<spdlog::sinks::stderr_sink_mt>());
  auto logger = std::make_shared<spdlog::logger>("mitogen-mux", sinks.begin(), sinks.end());
  logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %L [%P] %v");
  logger->set_level(spdlog::level::from_str(cfg.log_level));
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

/// Runs the daemon until it is asked to stop (MUX_STOP, idle timeout, a signal).
/// `ready` is called once it listens, with "" or the reason it could not start.
int run_daemon(const std::string& socket, const mux::config& cfg, std::shared_ptr<mux::instance_lock> lock,
               const std::function<void(const std::string&)>& ready) {
  // Signals are taken by sigtimedwait below, never by a handler: every thread the
  // daemon starts inherits this mask.
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  // Local contexts start where we are: not "/" (an interpreter started there by
  // a name without a slash, as ours are, finds its prefix as /lib/python3.X, not
  // /usr/lib/...), nor wherever the first worker happened to be (kept busy for as
  // long as we live): our own private directory.
  const std::string dir = fs::path(socket).parent_path().string();
  if (!dir.empty() && ::chdir(dir.c_str()) != 0) spdlog::warn("mitogen-mux: cannot chdir to {}", dir);
  std::shared_ptr<mux::daemon> d;
  try {
    d = mux::daemon::start(
        {.socket_path = socket, .cfg = cfg, .module_dir = module_dir(cfg), .lock = std::move(lock)});
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    ready(e.what());
    return exit_error;
  }
  ready("");
  while (!d->wait_stop_requested(std::chrono::milliseconds(0))) {
    timespec ts{0, 100 * 1000 * 1000};
    int sig = ::sigtimedwait(&set, nullptr, &ts);
    if (sig > 0) d->request_stop(std::string("signal ") + ::strsignal(sig));
  }
  d->shutdown();
  return exit_ok;
}

int serve(const args& a) {
  mux::config cfg;
  try {
    cfg = load_settings();
  } catch (const mux::config_error& e) {
    std::cerr << "mitogen-mux: " << e.what() << "\n";
    return exit_config;
  }
  const std::string dir = fs::path(a.socket).parent_path().string();
  if (auto why = mux::check_private_dir(dir.empty() ? "." : dir); !why.empty()) {
    std::cerr << "mitogen-mux: refusing to use " << a.socket << ": " << why << "\n";
    return exit_error;
  }
  // No umask of our own: local contexts inherit it, as a worker's commands would
  // (the socket, lock and log are made private one by one).
  std::unique_ptr<mux::instance_lock> lock;
  try {
    lock = mux::instance_lock::try_acquire(mux::lock_path(a.socket));
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return exit_error;
  }
  if (!lock) {
    std::cerr << "mitogen-mux: already running for " << a.socket << "\n";
    return exit_running;
  }
  try {
    setup_logging(cfg, !a.detach);
  } catch (const std::exception& e) {
    std::cerr << "mitogen-mux: cannot open the log file: " << e.what() << "\n";
    return exit_error;
  }
  if (!a.detach) return run_daemon(a.socket, cfg, std::move(lock), [](const std::string&) {});

  // Detached: the child becomes the daemon (it inherits the lock); we exit once it
  // listens, so whoever started us can attach as soon as we return.
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    std::cerr << "mitogen-mux: pipe: " << std::strerror(errno) << "\n";
    return exit_error;
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    std::cerr << "mitogen-mux: fork: " << std::strerror(errno) << "\n";
    return exit_error;
  }
  if (pid > 0) {
    ::close(p[1]);
    std::string msg;
    char buf[512];
    for (;;) {
      pollfd pf{p[0], POLLIN, 0};
      if (::poll(&pf, 1, 30000) <= 0) {
        std::cerr << "mitogen-mux: the daemon did not start within 30 s\n";
        return exit_error;
      }
      ssize_t n = ::read(p[0], buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      msg.append(buf, static_cast<std::size_t>(n));
    }
    if (msg == "R") return exit_ok;
    std::cerr << "mitogen-mux: the daemon did not start: " << (msg.empty() ? "it died (see the log)" : msg.substr(1))
              << "\n";
    return exit_error;
  }
  ::close(p[0]);
  ::setsid();
  int null = ::open("/dev/null", O_RDWR);
  if (null >= 0) {
    for (int fd = 0; fd < 3; ++fd) ::dup2(null, fd);
    if (null > 2) ::close(null);
  }
  lock->update_pid();
  return run_daemon(a.socket, cfg, std::move(lock), [&](const std::string& err) {
    std::string msg = err.empty() ? "R" : "E" + err;
    (void)!::write(p[1], msg.data(), msg.size());
    ::close(p[1]);
  });
}

// --- status -----------------------------------------------------------------------

const wire::value* find(const wire::dict& d, const char* key) {
  for (auto& [k, v] : d.items)
    if (k.is<wire::str>() && k.as<wire::str>().utf8 == key) return &v;
  return nullptr;
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += static_cast<char>(c);
    } else if (c < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else {
      o += static_cast<char>(c);
    }
  }
  return o + "\"";
}

std::string to_json(const wire::value& v) {
  if (v.is<wire::none>()) return "null";
  if (v.is<bool>()) return v.as<bool>() ? "true" : "false";
  if (v.is<std::int64_t>()) return std::to_string(v.as<std::int64_t>());
  if (v.is<double>()) {
    char b[32];
    std::snprintf(b, sizeof b, "%.3f", v.as<double>());
    return b;
  }
  if (v.is<wire::str>()) return json_string(v.as<wire::str>().utf8);
  const std::vector<wire::value>* items = nullptr;
  if (v.is<wire::list>()) items = &v.as<wire::list>().items;
  if (v.is<wire::tuple>()) items = &v.as<wire::tuple>().items;
  if (items) {
    std::string o = "[";
    for (std::size_t i = 0; i < items->size(); ++i) o += (i ? ", " : "") + to_json((*items)[i]);
    return o + "]";
  }
  if (v.is<wire::dict>()) {
    std::string o = "{";
    bool first = true;
    for (auto& [k, x] : v.as<wire::dict>().items) {
      o += (first ? "" : ", ") + json_string(k.is<wire::str>() ? k.as<wire::str>().utf8 : wire::describe(k)) + ": " +
           to_json(x);
      first = false;
    }
    return o + "}";
  }
  return json_string(wire::describe(v));
}

std::string text_of(const wire::value* v) {
  if (!v) return "";
  if (v->is<wire::str>()) return v->as<wire::str>().utf8;
  if (v->is<std::int64_t>()) return std::to_string(v->as<std::int64_t>());
  if (v->is<double>()) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1fs", v->as<double>());
    return b;
  }
  if (v->is<wire::none>()) return "-";
  return wire::describe(*v);
}

void print_status(const wire::value& st) {
  if (!st.is<wire::dict>()) {
    std::cout << to_json(st) << "\n";
    return;
  }
  const auto& d = st.as<wire::dict>();
  const auto* contexts = find(d, "contexts");
  const auto* rss = find(d, "rss_kib");
  std::cout << "mitogen-mux pid " << text_of(find(d, "pid")) << ", up " << text_of(find(d, "uptime")) << ", "
            << text_of(find(d, "clients")) << " client(s) attached (this one included), idle timeout "
            << text_of(find(d, "idle_timeout")) << " s, RSS "
            << (rss && rss->is<std::int64_t>() ? std::to_string(rss->as<std::int64_t>() / 1024) : std::string("?"))
            << " MiB\nsocket " << text_of(find(d, "socket")) << "\n";
  if (!contexts || !contexts->is<wire::list>() || contexts->as<wire::list>().items.empty()) {
    std::cout << "no contexts\n";
    return;
  }
  std::printf("%6s  %-32s %-40s %9s %9s %6s %7s\n", "ID", "NAME", "STACK", "AGE", "IDLE", "USES", "CLIENTS");
  for (const auto& c : contexts->as<wire::list>().items) {
    if (!c.is<wire::dict>()) continue;
    const auto& e = c.as<wire::dict>();
    std::printf("%6s  %-32s %-40s %9s %9s %6s %7s\n", text_of(find(e, "id")).c_str(), text_of(find(e, "name")).c_str(),
                text_of(find(e, "stack")).c_str(), text_of(find(e, "age")).c_str(), text_of(find(e, "idle")).c_str(),
                text_of(find(e, "uses")).c_str(), text_of(find(e, "clients")).c_str());
  }
}

/// Attach to a running daemon; nullptr (and a message) if none runs.
std::shared_ptr<mux::client> attach_running(const std::string& socket) {
  try {
    return mux::client::attach(socket, std::chrono::seconds(10));
  } catch (const std::system_error& e) {
    if (e.code().value() == ENOENT || e.code().value() == ECONNREFUSED || e.code().value() == ECONNRESET) {
      std::cerr << "mitogen-mux: not running (no daemon listens on " << socket << ")\n";
      return nullptr;
    }
    throw;
  }
}

int status(const args& a) {
  auto c = attach_running(a.socket);
  if (!c) return exit_not_running;
  auto st = c->status();
  c->detach();
  if (a.json)
    std::cout << to_json(st) << "\n";
  else
    print_status(st);
  return exit_ok;
}

bool process_alive(std::int64_t pid) {
  if (pid <= 0 || ::kill(static_cast<pid_t>(pid), 0) != 0) return false;
  // A zombie (the daemon run in the foreground by a parent that has not reaped it
  // yet) is gone for our purpose.
  FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (!f) return false;
  char buf[512] = {};
  std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  std::string s(buf, n);
  auto close = s.rfind(')');
  return close == std::string::npos || close + 2 >= s.size() || s[close + 2] != 'Z';
}

int stop(const args& a) {
  auto c = attach_running(a.socket);
  if (!c) return exit_ok;
  const auto pid = c->daemon_pid();
  c->stop();
  c->detach();
  // Return once it is gone, so that a `stop` followed by a start gives a new daemon.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (process_alive(pid)) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::cerr << "mitogen-mux: pid " << pid << " is still running after 30 s\n";
      return exit_error;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::cout << "mitogen-mux: stopped (pid " << pid << ")\n";
  return exit_ok;
}

}  // namespace

int main(int argc, char** argv) {
  args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-h" || s == "--help") {
      usage(std::cout);
      return exit_ok;
    } else if (s == "--detach") {
      a.detach = true;
    } else if (s == "--json") {
      a.json = true;
    } else if (s == "--socket" && i + 1 < argc) {
      a.socket = argv[++i];
    } else if (s.rfind("--socket=", 0) == 0) {
      a.socket = s.substr(9);
    } else if (a.command.empty() && !s.empty() && s[0] != '-') {
      a.command = s;
    } else {
      std::cerr << "mitogen-mux: unexpected argument '" << s << "'\n";
      usage(std::cerr);
      return exit_error;
    }
  }
  if (a.socket.empty()) a.socket = mux::default_socket_path(install_dir());
  try {
    if (a.command == "serve") return serve(a);
    if (a.command == "status") return status(a);
    if (a.command == "stop") return stop(a);
    if (a.command == "path") {
      std::cout << a.socket << "\n";
      return exit_ok;
    }
  } catch (const std::exception& e) {
    std::cerr << "mitogen-mux: " << e.what() << "\n";
    return exit_error;
  }
  usage(std::cerr);
  return exit_error;
}
