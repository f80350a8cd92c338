#include "mitogen/mux/daemon.hpp"

#include <utility>  // before Asio (Boost 1.74 + C++20)

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string_view>

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

#include "mitogen/context/connection_stack.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/mux/protocol.hpp"
#include "mitogen/services/module_responder.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/pickle.hpp"
#include "registry.hpp"

namespace mitogen::mux {

namespace detail {

/// The listening socket and the idle timer: Asio objects of the broker thread.
class listener {
 public:
  explicit listener(boost::asio::io_context& io) : acceptor(io), idle(io) {}
  boost::asio::local::stream_protocol::acceptor acceptor;
  boost::asio::steady_timer idle;
  dev_t dev = 0;  ///< identity of the socket file we made, so we only ever remove ours
  ino_t ino = 0;
  bool closed = false;  // broker thread
};

}  // namespace detail

namespace {

/// Resident memory of this process, KiB (for status and the benchmark).
std::int64_t rss_kib() {
  std::ifstream f("/proc/self/statm");
  long pages = 0, resident = 0;
  f >> pages >> resident;
  return resident * (::sysconf(_SC_PAGESIZE) / 1024);
}

/// A local context started for a client gets the client's environment (as the
/// commands of a worker's stock local connection would): `environ` is a list of
/// "NAME=value" bytes or str.
void apply_client_environ(connection_stack& stack, const wire::value& environ) {
  if (!environ.is<wire::list>()) throw stack_error("environ: expected a list of NAME=value entries");
  std::vector<std::string> env;
  for (const auto& e : environ.as<wire::list>().items) {
    std::string entry;
    if (e.is<wire::bytes>()) entry = e.as<wire::bytes>().data;
    else if (e.is<wire::str>()) entry = e.as<wire::str>().utf8;
    else throw stack_error("environ: expected NAME=value entries, got " + wire::describe(e));
    if (entry.find('=') == std::string::npos || entry.find('\0') != std::string::npos)
      throw stack_error("environ: an entry is not NAME=value");
    env.push_back(std::move(entry));
  }
  if (auto* o = std::get_if<local_options>(&stack.front().options)) o->environment = std::move(env);
}

/// The client's environment, as far as connecting depends on it: its ssh agent.
/// `env` maps names to str or None (None: unset in the client).
void apply_client_env(connection_stack& stack, const wire::dict& env) {
  for (auto& [k, v] : env.items) {
    if (!k.is<wire::str>() || k.as<wire::str>().utf8 != "SSH_AUTH_SOCK") continue;
    if (!v.is<wire::str>() && !v.is<wire::none>()) throw stack_error("env: SSH_AUTH_SOCK must be a str or None");
    const std::string sock = v.is<wire::str>() ? v.as<wire::str>().utf8 : "";
    for (auto& h : stack) {
      if (auto* o = std::get_if<ssh_options>(&h.options)) {
        // The client's agent, or none if it has none: never the one the daemon
        // inherited from whichever worker started it.
        if (sock.empty())
          o->use_agent = false;
        else
          o->agent_socket = sock;
      }
    }
  }
}

/// Decode and parse a request's connection stack: a list of hops, or
/// `{'stack': [...], 'env': {...}}`. Throws stack_error.
connection_stack stack_of(const wire::message& m) {
  auto r = wire::decode(m.data);
  if (!r) throw stack_error("undecodable request: " + r.ec.message());
  if (!r.v.is<wire::dict>()) return parse_connection_stack(r.v);
  const wire::value* stack = nullptr;
  const wire::value* env = nullptr;
  const wire::value* environ = nullptr;
  for (auto& [k, v] : r.v.as<wire::dict>().items) {
    if (!k.is<wire::str>()) throw stack_error("request keys must be strings");
    const auto& key = k.as<wire::str>().utf8;
    if (key == "stack") stack = &v;
    else if (key == "env") env = &v;
    else if (key == "environ") environ = &v;
    else throw stack_error("unknown request key '" + key + "' (stack, env, environ)");
  }
  if (!stack) throw stack_error("request without a stack");
  auto parsed = parse_connection_stack(*stack);
  if (env && !env->is<wire::none>()) {
    if (!env->is<wire::dict>()) throw stack_error("env: expected a dict");
    apply_client_env(parsed, env->as<wire::dict>());
  }
  if (environ && !environ->is<wire::none>()) apply_client_environ(parsed, *environ);
  return parsed;
}

}  // namespace

daemon::daemon(daemon_options opts) : opts_(std::move(opts)) {}

std::shared_ptr<daemon> daemon::start(daemon_options opts) {
  auto d = std::shared_ptr<daemon>(new daemon(std::move(opts)));
  d->broker_ = std::make_shared<broker>();
  // The daemon's broker forwards every client's calls and every context's replies:
  // a context stream a worker led must be watched again at once, not within the
  // park limit (stream::end_lead).
  d->broker_->set_park_limit(std::chrono::microseconds(0));
  d->router_ = router::create(d->broker_);
  // Contexts never talk to each other; only the clients (and we) talk to them.
  d->router_->set_unidirectional(true);
  if (!d->opts_.module_dir.empty()) {
    struct stat st {};
    const std::string target = d->opts_.module_dir + "/mitogen_native_target.py";
    d->module_id_ = identify(target);
    if (::stat(target.c_str(), &st) != 0)
      spdlog::warn("mitogen-mux: {} does not exist: contexts importing mitogen_native_target will fail (module_dir, "
                   "${})",
                   target, module_dir_env);
    // Exactly the module the Ansible plugins call into, and nothing else: a target
    // cannot fish other files out of the controller through us.
    d->responder_ = module_responder::create(
        d->router_, {.search_path = {d->opts_.module_dir}, .allow = {"mitogen_native_target"}});
  }
  std::weak_ptr<daemon> weak = d;
  d->registry_ = detail::registry::create(d->router_, {.max_contexts = d->opts_.cfg.max_contexts,
                                                       .connect_threads = d->opts_.cfg.connect_threads,
                                                       .attached = [weak](std::uint32_t id) {
                                                         auto self = weak.lock();
                                                         return self && self->is_client(id);
                                                       }});
  d->listener_ = std::make_shared<detail::listener>(d->broker_->io());
  d->register_handlers();
  try {
    d->listen();
  } catch (...) {
    d->shutdown();
    throw;
  }
  return d;
}

daemon::~daemon() { shutdown(); }

void daemon::listen() {
  const std::string& path = opts_.socket_path;
  if (path.size() >= sizeof(sockaddr_un::sun_path))
    throw error("mitogen-mux: socket path too long (" + std::to_string(path.size()) + " bytes): " + path);
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    // Whoever holds the lock is the daemon; we do, so this is a dead one's socket.
    if (!S_ISSOCK(st.st_mode)) throw error("mitogen-mux: " + path + " exists and is not a socket; not replacing it");
    spdlog::info("mitogen-mux: replacing the stale socket {}", path);
    ::unlink(path.c_str());
  }
  auto& acc = listener_->acceptor;
  boost::system::error_code ec;
  boost::asio::local::stream_protocol::endpoint ep(path);
  acc.open(ep.protocol(), ec);
  if (!ec) acc.bind(ep, ec);
  // The directory is private already; the socket is too, in case it is moved.
  if (!ec && ::chmod(path.c_str(), 0600) != 0) ec.assign(errno, boost::system::system_category());
  if (!ec) acc.listen(128, ec);
  if (ec) throw error("mitogen-mux: cannot listen on " + path + ": " + ec.message());
  if (::lstat(path.c_str(), &st) == 0) {
    listener_->dev = st.st_dev;
    listener_->ino = st.st_ino;
  }
  ::fcntl(acc.native_handle(), F_SETFD, FD_CLOEXEC);
  spdlog::info("mitogen-mux: pid {} listening on {} (idle timeout {} s, max {} contexts, modules from {})", ::getpid(),
               path, opts_.cfg.idle_timeout.count(), opts_.cfg.max_contexts,
               opts_.module_dir.empty() ? std::string("nowhere") : opts_.module_dir);

  std::weak_ptr<daemon> weak = weak_from_this();
  broker_->defer([weak] {
    if (auto self = weak.lock()) {
      self->accept_next();
      self->arm_idle();
    }
  });
}

void daemon::accept_next() {
  // Accept forever on the broker thread; each accepted socket is checked and attached.
  std::weak_ptr<daemon> weak = weak_from_this();
  auto l = listener_;
  l->acceptor.async_accept([weak, l](const boost::system::error_code& e, boost::asio::local::stream_protocol::socket sock) {
    if (e == boost::asio::error::operation_aborted || l->closed) return;
    auto self = weak.lock();
    if (!self) return;
    if (!e) {
      self->admit(sock.release());
      return self->accept_next();
    }
    // Out of descriptors, most likely: try again shortly rather than spin.
    spdlog::warn("mitogen-mux: accept failed: {}", e.message());
    auto t = std::make_shared<boost::asio::steady_timer>(l->acceptor.get_executor(), std::chrono::milliseconds(100));
    t->async_wait([weak, t](const boost::system::error_code&) {
      if (auto self = weak.lock()) self->accept_next();
    });
  });
}

void daemon::register_handlers() {
  std::weak_ptr<daemon> weak = weak_from_this();
  // Only attached clients may ask: a context (a target host) that sends us
  // MUX_CONNECT must not make us connect anywhere on its behalf.
  auto policy = [weak](const wire::message& m) {
    auto self = weak.lock();
    return self && self->is_client(m.src_id);
  };
  auto bind = [&](std::uint32_t handle, void (daemon::*fn)(wire::message&&)) {
    router_->add_handler(
        [weak, fn](wire::message&& m) {
          if (m.is_dead()) return;
          if (auto self = weak.lock()) ((*self).*fn)(std::move(m));
        },
        {.handle = handle, .persist = true, .respondent = std::nullopt, .policy = policy});
  };
  bind(wire::MUX_CONNECT, &daemon::on_connect);
  bind(wire::MUX_RESET, &daemon::on_reset);
  bind(wire::MUX_STATUS, &daemon::on_status);
  bind(wire::MUX_STOP, &daemon::on_stop);
}

bool daemon::is_client(std::uint32_t id) const {
  std::lock_guard lk(clients_mu_);
  return clients_.count(id) > 0;
}

daemon::file_id daemon::identify(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino, static_cast<std::int64_t>(st.st_size),
          static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

std::string daemon::staleness() const {
  // Replaced by a rebuild or an upgrade: the kernel says so of our own program.
  char exe[4096];
  ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    std::string_view e(exe, static_cast<std::size_t>(n));
    if (e.size() > 10 && e.substr(e.size() - 10) == " (deleted)") return "its program was replaced";
  }
  // The module we serve changed: contexts would get the old one from our cache.
  if (!opts_.module_dir.empty() && identify(opts_.module_dir + "/mitogen_native_target.py") != module_id_)
    return opts_.module_dir + "/mitogen_native_target.py changed";
  return "";
}

void daemon::retire(const std::string& why) {
  if (retired_.exchange(true)) return;
  std::size_t left = clients();
  spdlog::info("mitogen-mux: retiring ({}): a new daemon takes the socket; serving the {} attached client(s) "
               "until they detach",
               why, left);
  auto& l = *listener_;
  l.closed = true;
  boost::system::error_code ig;
  l.acceptor.close(ig);
  l.idle.cancel();
  struct stat st {};
  if (l.ino && ::lstat(opts_.socket_path.c_str(), &st) == 0 && st.st_dev == l.dev && st.st_ino == l.ino)
    ::unlink(opts_.socket_path.c_str());
  opts_.lock.reset();
  if (left == 0) request_stop("retired, and no client is attached");
}

bool daemon::retired() const { return retired_.load(); }

void daemon::admit(int fd) {
  if (!retired_) {
    if (auto why = staleness(); !why.empty()) retire(why);
  }
  if (retired_) {
    // This client goes to the next daemon: it sees us hang up before greeting it.
    ::close(fd);
    return;
  }
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    spdlog::warn("mitogen-mux: refused a client: cannot read its credentials: {}", std::strerror(errno));
    ::close(fd);
    return;
  }
  if (cred.uid != ::geteuid()) {
    spdlog::warn("mitogen-mux: refused a client of uid {} (pid {}): only uid {} may attach", cred.uid, cred.pid,
                 ::geteuid());
    ::close(fd);
    return;
  }
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  const std::uint32_t id = router_->allocate_id();
  auto s = stream::create(broker_, fd, fd, {.name = "client." + std::to_string(id) + " (pid " + std::to_string(cred.pid) + ")"});
  {
    std::lock_guard lk(clients_mu_);
    clients_[id] = client_info{cred.pid, std::chrono::steady_clock::now()};
    had_client_ = true;
  }
  listener_->idle.cancel();
  wire::message hi;
  hi.dst_id = id;
  hi.src_id = hi.auth_id = router_->context_id();
  hi.handle = wire::MUX_HELLO;
  hi.data = encode_hello({id, protocol_version, ::getpid()});
  s->send(std::move(hi));  // before anything else can reach the client
  std::weak_ptr<daemon> weak = weak_from_this();
  router_->add_teardown(id, [weak, id](std::function<void()> done) {
    if (auto self = weak.lock()) self->on_client_gone(id);
    done();
  });
  router_->add_route(id, "client." + std::to_string(id), s, {.trusted = true});
  // A client speaks only for itself (nothing is routed through it): a frame naming
  // another source is a broken or hostile client, dropped at once, like one whose
  // framing is bad. The router alone would only drop the frame.
  std::weak_ptr<stream> weak_s = s;
  std::weak_ptr<router> weak_r = router_;
  s->on_message([inner = s->message_handler(), weak_s, weak_r, id](wire::message&& m) {
    if (m.src_id != id || m.auth_id != id) {
      spdlog::warn("mitogen-mux: client {} sent a frame claiming src_id={} auth_id={}; dropping the client", id,
                   m.src_id, m.auth_id);
      if (auto st = weak_s.lock()) st->close(make_error_code(errc::protocol_error), "frame with a foreign source");
      return;
    }
    // A message for a context that is gone (it died, was reset or evicted while the
    // client still held it): answer for it. The router's own "no route" answer
    // comes from us, context 0, and a client router accepts a call's reply (dead or
    // not) only from the context called, so the caller would wait forever.
    if (m.dst_id != wire::master_id) {
      auto r = weak_r.lock();
      if (r && !r->stream_for(m.dst_id)) {
        if (m.reply_to && !m.is_dead()) {
          auto dead = wire::message::dead(id, m.reply_to,
                                          "context " + std::to_string(m.dst_id) + " is gone (it exited, or was reset)");
          dead.src_id = dead.auth_id = m.dst_id;
          if (auto st = weak_s.lock()) st->send(std::move(dead));
        }
        return;
      }
    }
    inner(std::move(m));
  });
  s->start();
  spdlog::debug("mitogen-mux: client {} attached (pid {})", id, cred.pid);
}

void daemon::on_client_gone(std::uint32_t id) {
  std::size_t left;
  {
    std::lock_guard lk(clients_mu_);
    clients_.erase(id);
    left = clients_.size();
  }
  spdlog::debug("mitogen-mux: client {} detached ({} left)", id, left);
  registry_->client_gone(id);
  if (left == 0 && retired_) return request_stop("retired, and the last client detached");
  if (left == 0) arm_idle();
}

void daemon::arm_idle() {
  bool had;
  {
    std::lock_guard lk(clients_mu_);
    if (!clients_.empty()) return;
    had = had_client_;
  }
  auto& l = *listener_;
  if (l.closed) return;
  auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(opts_.cfg.idle_timeout);
  if (!had) wait = std::max(wait, opts_.first_client_grace);
  if (wait.count() == 0) return request_stop("the last client detached (idle_timeout 0)");
  std::weak_ptr<daemon> weak = weak_from_this();
  l.idle.expires_after(wait);
  l.idle.async_wait([weak, wait](const boost::system::error_code& ec) {
    if (ec) return;  // a client attached
    auto self = weak.lock();
    if (!self) return;
    {
      std::lock_guard lk(self->clients_mu_);
      if (!self->clients_.empty()) return;
    }
    self->request_stop("no client for " + std::to_string(wait.count() / 1000) + " s");
  });
}

void daemon::reply(const wire::message& to, std::string payload) {
  if (!to.reply_to) return;
  wire::message r;
  r.dst_id = to.src_id;
  r.handle = to.reply_to;
  r.data = std::move(payload);
  router_->route(std::move(r));
}

void daemon::on_connect(wire::message&& m) {
  connection_stack stack;
  try {
    stack = stack_of(m);
  } catch (const stack_error& e) {
    spdlog::warn("mitogen-mux: client {} sent a bad MUX_CONNECT: {}", m.src_id, e.what());
    return reply(m, encode_error("bad_request", e.what()));
  }
  auto weak = weak_from_this();
  wire::message to;
  to.src_id = m.src_id;
  to.reply_to = m.reply_to;
  registry_->connect(std::move(stack), m.src_id, [weak, to](detail::connect_result r) {
    auto self = weak.lock();
    if (!self) return;
    if (r.ok())
      self->reply(to, encode_connected(r.ctx->id(), r.ctx->name()));
    else
      self->reply(to, encode_error(error_kind(r.ec), r.message));
  });
}

void daemon::on_reset(wire::message&& m) {
  try {
    auto n = registry_->reset(stack_of(m));
    reply(m, wire::encode(wire::value(static_cast<std::int64_t>(n))));
  } catch (const stack_error& e) {
    reply(m, encode_error("bad_request", e.what()));
  }
}

void daemon::on_status(wire::message&& m) {
  wire::dict d;
  auto put = [&](const char* k, wire::value v) { d.items.emplace_back(wire::str{k}, std::move(v)); };
  put("pid", static_cast<std::int64_t>(::getpid()));
  put("version", protocol_version);
  put("socket", wire::str{opts_.socket_path});
  put("uptime", std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  put("idle_timeout", static_cast<std::int64_t>(opts_.cfg.idle_timeout.count()));
  put("max_contexts", static_cast<std::int64_t>(opts_.cfg.max_contexts));
  put("module_dir", wire::str{opts_.module_dir});
  put("clients", static_cast<std::int64_t>(clients()));
  put("retired", retired_.load());
  put("rss_kib", rss_kib());
  put("contexts", registry_->status());
  reply(m, wire::encode(wire::value(std::move(d))));
}

void daemon::on_stop(wire::message&& m) {
  std::int64_t pid = 0;
  {
    std::lock_guard lk(clients_mu_);
    if (auto it = clients_.find(m.src_id); it != clients_.end()) pid = it->second.pid;
  }
  reply(m, wire::encode(wire::value(true)));
  request_stop("asked to stop by client " + std::to_string(m.src_id) + " (pid " + std::to_string(pid) + ")");
}

void daemon::request_stop(const std::string& why) {
  {
    std::lock_guard lk(stop_mu_);
    if (stop_requested_) return;
    stop_requested_ = true;
  }
  spdlog::info("mitogen-mux: stopping: {}", why);
  stop_cv_.notify_all();
}

bool daemon::wait_stop_requested(std::chrono::milliseconds timeout) {
  std::unique_lock lk(stop_mu_);
  return stop_cv_.wait_for(lk, timeout, [&] { return stop_requested_; });
}

void daemon::shutdown() {
  {
    std::lock_guard lk(shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (broker_ && listener_) {
    auto l = listener_;
    broker_->defer_sync([l] {
      l->closed = true;
      boost::system::error_code ig;
      l->acceptor.close(ig);
      l->idle.cancel();
    });
    // Only our own socket file: a new daemon may have replaced it already.
    struct stat st {};
    if (l->ino && ::lstat(opts_.socket_path.c_str(), &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
      ::unlink(opts_.socket_path.c_str());
  }
  if (registry_) spdlog::info("mitogen-mux: shutting down {} context(s)", registry_->size());
  // The router's shutdown asks every context to exit and releases bootstraps in
  // progress; then the connect threads can be joined.
  if (broker_) {
    broker_->shutdown();
    broker_->join();
  }
  if (registry_) registry_->shutdown();
  responder_.reset();
  opts_.lock.reset();  // last: a new daemon may start once our contexts are gone
  spdlog::info("mitogen-mux: stopped");
}

std::size_t daemon::clients() const {
  std::lock_guard lk(clients_mu_);
  return clients_.size();
}

std::size_t daemon::contexts() const { return registry_ ? registry_->size() : 0; }

}  // namespace mitogen::mux
