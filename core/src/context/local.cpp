#include "mitogen/context/local.hpp"

#include <pwd.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

#include "bootstrap.hpp"
#include "mitogen/errors.hpp"
#include "process.hpp"

namespace mitogen {
namespace {

/// What the connecting thread waits on.
struct boot_state {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool ok = false;
  bool stderr_eof = false;
  std::error_code ec;
  std::string why;
  std::string stderr_text;

  void finish(bool success, std::error_code e = {}, std::string w = {}) {
    {
      std::lock_guard lk(mu);
      if (done) return;
      done = true;
      ok = success;
      ec = e;
      why = std::move(w);
    }
    cv.notify_all();
  }
};

/// Reads the child's stderr: kept for error messages during bootstrap, logged after.
struct stderr_reader : std::enable_shared_from_this<stderr_reader> {
  boost::asio::posix::stream_descriptor d;
  std::shared_ptr<boot_state> boot;
  std::string name;
  std::string line;
  char buf[4096];
  stderr_reader(boost::asio::io_context& io, int fd, std::shared_ptr<boot_state> b, std::string n)
      : d(io, fd), boot(std::move(b)), name(std::move(n)) {}
  void start() {
    d.async_read_some(boost::asio::buffer(buf), [self = shared_from_this()](const boost::system::error_code& ec,
                                                                               std::size_t n) {
      if (ec) {
        if (!self->line.empty()) spdlog::warn("[{}] stderr: {}", self->name, self->line);
        std::lock_guard lk(self->boot->mu);
        self->boot->stderr_eof = true;
        self->boot->cv.notify_all();
        return;
      }
      {
        std::lock_guard lk(self->boot->mu);
        if (self->boot->stderr_text.size() < 16384) self->boot->stderr_text.append(self->buf, n);
      }
      // Before the agent takes over fd 2, anything here is an interpreter error.
      self->line.append(self->buf, n);
      std::size_t pos;
      while ((pos = self->line.find('\n')) != std::string::npos) {
        spdlog::warn("[{}] stderr: {}", self->name, self->line.substr(0, pos));
        self->line.erase(0, pos + 1);
      }
      self->start();
    });
  }
};

std::vector<std::string> python_argv(const connect_options& o) {
  if (!o.python_path.empty()) return o.python_path;
  if (::access("/usr/bin/python3", X_OK) == 0) return {"/usr/bin/python3"};
  return {"python3"};
}

}  // namespace

std::string default_remote_name() {
  std::string user = "unknown";
  if (auto* pw = ::getpwuid(::getuid())) user = pw->pw_name;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return user + "@" + host + ":" + std::to_string(::getpid());
}

context local(router& r, const local_options& o) {
  auto b = r.get_broker();
  if (b->on_broker_thread()) throw error("mitogen: local() must not be called on the broker thread");
  if (r.is_shut_down() || b->shutting_down())
    throw stream_error(make_error_code(errc::broker_shut_down), "mitogen: the router has been shut down");

  const std::uint32_t id = r.allocate_id();
  const std::string name = o.remote_name.value_or(default_remote_name());
  std::vector<std::string> argv = python_argv(o);
  argv.push_back("-c");
  argv.push_back(detail::stage1_command());

  detail::spawned child;
  if (auto ec = detail::spawn_piped(argv, "mitogen:" + name, child))
    throw stream_error(make_error_code(errc::spawn_failed),
                       "mitogen: cannot start " + argv.front() + ": " + ec.message());

  auto boot = std::make_shared<boot_state>();
  auto s = stream::create(b, child.stdout_r, child.stdin_w,
                          {.name = name, .max_message_size = o.max_message_size});
  auto err = std::make_shared<stderr_reader>(b->io(), child.stderr_r, boot, name);

  // Reap the child whenever its stream goes, whatever the reason.
  r.add_teardown(id, [b, pid = child.pid](std::function<void()> done) {
    detail::reap_child(b, pid, std::chrono::milliseconds(1000), std::move(done));
  });
  r.add_route(id, name, s);
  // Fails the bootstrap when the stream dies before MITO001.
  const std::uint32_t watch = r.add_handler(
      [boot](wire::message&& m) { boot->finish(false, make_error_code(errc::child_died), m.data); },
      {.handle = 0, .persist = false, .respondent = id});

  detail::agent_config cfg{id, {r.context_id()}, name, o.debug, o.log_level, o.max_message_size};
  auto scanner = std::make_shared<detail::marker_scanner>();
  std::weak_ptr<stream> weak_s = s;
  s->start([scanner, cfg, weak_s, boot](std::string_view data, bool& framed) -> std::size_t {
    std::size_t total = 0;
    for (;;) {
      std::size_t used = 0;
      auto ev = scanner->scan(data.substr(total), used);
      total += used;
      if (ev == detail::marker_scanner::event::none) return total;
      if (ev == detail::marker_scanner::event::stage1_ready) {
        if (auto s = weak_s.lock()) s->send_raw(detail::preamble(cfg));
        continue;
      }
      framed = true;
      boot->finish(true);
      return total;
    }
  });
  b->defer([err] { err->start(); });

  auto timer = std::make_shared<boost::asio::steady_timer>(b->io());
  b->defer([timer, boot, timeout = o.connect_timeout] {
    timer->expires_after(timeout);
    timer->async_wait([boot](const boost::system::error_code& ec) {
      if (!ec) boot->finish(false, make_error_code(errc::connect_timeout), "connect timeout");
    });
  });

  std::unique_lock lk(boot->mu);
  boot->cv.wait(lk, [&] { return boot->done; });
  if (boot->ok) {
    lk.unlock();
    b->defer([timer] { timer->cancel(); });
    r.del_handler(watch);
    return context(r.shared_from_this(), id, name);
  }
  lk.unlock();
  // Stop the scanner before reading its noise (it runs on the broker thread).
  b->defer_sync([&] { s->close(boot->ec, "bootstrap failed"); });
  lk.lock();
  // Give the interpreter's last words a moment to arrive: they say what went wrong.
  boot->cv.wait_for(lk, std::chrono::milliseconds(300), [&] { return boot->stderr_eof; });
  std::string msg = "mitogen: context '" + name + "' failed to start: " +
                    (boot->ec == errc::connect_timeout
                         ? "no bootstrap within " + std::to_string(o.connect_timeout.count()) + " ms"
                         : boot->why);
  auto ec = boot->ec;
  if (!boot->stderr_text.empty()) msg += "; stderr: " + boot->stderr_text;
  if (!scanner->noise().empty()) msg += "; stdout: " + scanner->noise();
  lk.unlock();
  b->defer([timer] { timer->cancel(); });
  r.del_handler(watch);
  throw stream_error(ec, msg);
}

}  // namespace mitogen
