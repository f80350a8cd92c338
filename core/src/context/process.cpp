#include "process.hpp"

#include <fcntl.h>
#include <stdlib.h>
#include <termios.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>

#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

extern char** environ;

namespace mitogen::detail {
namespace {

struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

bool make_pipe(fd_guard& r, fd_guard& w) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return false;
  r.fd = p[0];
  w.fd = p[1];
  return true;
}

}  // namespace

namespace {

/// spawn_piped(), plus: when `ctty` is set, the child opens that terminal once right
/// after setsid() (as a session leader without a controlling terminal, so it becomes
/// its controlling terminal) and closes the descriptor again before exec.
std::error_code spawn_impl(const std::vector<std::string>& argv, const std::string& argv0, const char* ctty,
                           spawned& out, const std::vector<std::string>* env = nullptr) {
  fd_guard in_r, in_w, out_r, out_w, err_r, err_w;
  if (!make_pipe(in_r, in_w) || !make_pipe(out_r, out_w) || !make_pipe(err_r, err_w))
    return {errno, std::generic_category()};
  // Big pipes let a 1 MiB message cross in one write (best effort: capped by
  // /proc/sys/fs/pipe-max-size for unprivileged users).
  ::fcntl(in_w.fd, F_SETPIPE_SZ, 1 << 20);
  ::fcntl(out_w.fd, F_SETPIPE_SZ, 1 << 20);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in_r.fd, 0);
  posix_spawn_file_actions_adddup2(&fa, out_w.fd, 1);
  posix_spawn_file_actions_adddup2(&fa, err_w.fd, 2);
  // Descriptors the host program left inheritable must not reach the child, or it
  // could keep another child's pipe open and never see its parent hang up.
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  if (ctty) {
    // glibc runs the file actions after POSIX_SPAWN_SETSID's setsid(): opening the
    // terminal without O_NOCTTY makes it the new session's controlling terminal (what
    // TIOCSCTTY would do), and it stays so after the descriptor is closed again.
    posix_spawn_file_actions_addopen(&fa, 3, ctty, O_RDWR, 0);
    posix_spawn_file_actions_addclose(&fa, 3);
  }

  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  sigdelset(&all, SIGKILL);
  sigdelset(&all, SIGSTOP);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  // A new session: Ctrl-C in the controller's terminal must reach the controller
  // only, never kill its contexts behind its back.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);

  std::vector<char*> cargv;
  cargv.push_back(const_cast<char*>(argv0.c_str()));
  for (std::size_t i = 1; i < argv.size(); ++i) cargv.push_back(const_cast<char*>(argv[i].c_str()));
  cargv.push_back(nullptr);

  std::vector<char*> cenv;
  if (env) {
    for (const auto& e : *env) cenv.push_back(const_cast<char*>(e.c_str()));
    cenv.push_back(nullptr);
  }
  char** envp = env ? cenv.data() : environ;

  pid_t pid = -1;
  const std::string& path = argv.at(0);
  int rc = path.find('/') == std::string::npos ? posix_spawnp(&pid, path.c_str(), &fa, &attr, cargv.data(), envp)
                                               : posix_spawn(&pid, path.c_str(), &fa, &attr, cargv.data(), envp);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return {rc, std::generic_category()};
  out.pid = pid;
  out.stdin_w = in_w.release();
  out.stdout_r = out_r.release();
  out.stderr_r = err_r.release();
  return {};
}

}  // namespace

std::error_code spawn_piped(const std::vector<std::string>& argv, const std::string& argv0, spawned& out,
                            const std::vector<std::string>* env) {
  return spawn_impl(argv, argv0, nullptr, out, env);
}

std::error_code spawn_with_tty(const std::vector<std::string>& argv, const std::string& argv0, spawned_tty& out) {
  fd_guard master, slave;
  master.fd = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (master.fd < 0 || ::grantpt(master.fd) != 0 || ::unlockpt(master.fd) != 0)
    return {errno, std::generic_category()};
  char name[128];
  if (int rc = ::ptsname_r(master.fd, name, sizeof name); rc != 0) return {rc, std::generic_category()};
  slave.fd = ::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (slave.fd < 0) return {errno, std::generic_category()};
  // No echo: a password typed into the terminal must never come back to us (and so
  // into a log line or an error message).
  termios t{};
  if (::tcgetattr(slave.fd, &t) == 0) {
    t.c_lflag &= ~static_cast<tcflag_t>(ECHO | ECHONL);
    ::tcsetattr(slave.fd, TCSANOW, &t);
  }
  if (auto ec = spawn_impl(argv, argv0, name, out)) return ec;
  out.tty_master = master.release();
  out.tty_slave = slave.release();
  return {};
}

void reap_child(const std::shared_ptr<broker>& b, pid_t pid, std::chrono::milliseconds grace,
                std::function<void()> done, std::function<void(int)> on_status) {
  struct state {
    std::shared_ptr<broker> b;
    pid_t pid;
    std::chrono::steady_clock::time_point deadline;
    std::function<void()> done;
    boost::asio::steady_timer timer;
    bool killed = false;
    state(std::shared_ptr<broker> br, pid_t p, std::chrono::milliseconds g, std::function<void()> d)
        : b(std::move(br)), pid(p), deadline(std::chrono::steady_clock::now() + g), done(std::move(d)), timer(b->io()) {}
  };
  auto st = std::make_shared<state>(b, pid, grace, std::move(done));
  auto poll = std::make_shared<std::function<void()>>();
  *poll = [st, on_status = std::move(on_status), weak = std::weak_ptr<std::function<void()>>(poll)]() {
    int status = 0;
    pid_t r = ::waitpid(st->pid, &status, WNOHANG);
    if (r == st->pid && on_status && !st->killed) on_status(status);
    if (r == st->pid || (r < 0 && errno == ECHILD)) {
      if (st->killed) spdlog::debug("mitogen: child {} killed after grace period", st->pid);
      auto d = std::move(st->done);
      if (d) d();
      return;
    }
    if (!st->killed && std::chrono::steady_clock::now() >= st->deadline) {
      ::kill(st->pid, SIGKILL);
      st->killed = true;
    }
    auto self = weak.lock();
    if (!self) return;
    st->timer.expires_after(std::chrono::milliseconds(5));
    st->timer.async_wait([self](const boost::system::error_code& ec) {
      (*self)();  // also on cancellation: never leave a zombie
    });
  };
  // The poll function owns itself through the timer handler's capture.
  auto keep = poll;
  (*keep)();
}

std::vector<std::string> python_argv(const std::vector<std::string>& python_path) {
  if (!python_path.empty()) return python_path;
  if (::access("/usr/bin/python3", X_OK) == 0) return {"/usr/bin/python3"};
  return {"python3"};
}

std::string sh_quote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

}  // namespace mitogen::detail
