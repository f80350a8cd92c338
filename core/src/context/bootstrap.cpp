#include "bootstrap.hpp"

#include <sys/wait.h>

#include <cstring>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen::detail {

extern const unsigned char agent_z[];
extern const std::size_t agent_z_len;
extern const unsigned char stage1_src[];
extern const std::size_t stage1_len;

std::string_view compressed_agent() { return {reinterpret_cast<const char*>(agent_z), agent_z_len}; }

std::string stage1_command() {
  std::string s(reinterpret_cast<const char*>(stage1_src), stage1_len);
  static constexpr std::string_view token = "PREAMBLE_LEN";
  auto pos = s.find(token);
  if (pos != std::string::npos) s.replace(pos, token.size(), std::to_string(agent_z_len));
  return s;
}

std::string base64(std::string_view in, bool pad) {
  static constexpr char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  auto u = [&](std::size_t k) { return static_cast<unsigned>(static_cast<unsigned char>(in[k])); };
  for (; i + 2 < in.size(); i += 3) {
    unsigned v = u(i) << 16 | u(i + 1) << 8 | u(i + 2);
    out += tab[v >> 18];
    out += tab[(v >> 12) & 63];
    out += tab[(v >> 6) & 63];
    out += tab[v & 63];
  }
  if (i < in.size()) {
    unsigned v = u(i) << 16 | (i + 1 < in.size() ? u(i + 1) << 8 : 0);
    out += tab[v >> 18];
    out += tab[(v >> 12) & 63];
    if (i + 1 < in.size()) out += tab[(v >> 6) & 63];
    if (pad) out.append(i + 1 < in.size() ? 1 : 2, '=');
  }
  return out;
}

std::string stage1_oneliner() {
  // The login shell parses this, so it carries the source as base64: no newlines,
  // no single quotes, nothing the shell would expand inside '...'.
  return "import base64;exec(base64.b64decode(\"" + base64(stage1_command()) + "\"))";
}

std::string preamble(const agent_config& cfg) {
  wire::list parents;
  for (auto id : cfg.parent_ids) parents.items.emplace_back(static_cast<std::int64_t>(id));
  wire::dict d;
  d.items.emplace_back(wire::str{"context_id"}, static_cast<std::int64_t>(cfg.context_id));
  d.items.emplace_back(wire::str{"parent_ids"}, std::move(parents));
  d.items.emplace_back(wire::str{"remote_name"}, wire::str{cfg.remote_name});
  d.items.emplace_back(wire::str{"debug"}, cfg.debug);
  d.items.emplace_back(wire::str{"log_level"}, static_cast<std::int64_t>(cfg.log_level));
  d.items.emplace_back(wire::str{"max_message_size"}, static_cast<std::int64_t>(cfg.max_message_size));
  wire::message m;
  m.dst_id = cfg.context_id;
  m.src_id = m.auth_id = cfg.parent_ids.empty() ? 0 : cfg.parent_ids.front();
  m.handle = wire::BOOTSTRAP;
  m.data = wire::encode(wire::value(std::move(d)));
  std::string out(compressed_agent());
  out += wire::encode_frame(m);
  return out;
}

marker_scanner::event marker_scanner::scan(std::string_view data, std::size_t& consumed) {
  static constexpr std::string_view markers[2] = {"MITO000\n", "MITO001\n"};
  // Upstream Mitogen's core announces itself once more when its ExternalContext is
  // up; our agent goes straight to frames. A frame cannot start with these 8 bytes
  // (its dst_id would be "TO00"), so they are told apart by content.
  static constexpr std::string_view ec2 = "MITO002\n";
  consumed = 0;
  if (state_ >= 3) return event::none;
  if (state_ == 2) {
    if (data.empty()) return event::none;
    if (data.size() < ec2.size() && ec2.substr(0, data.size()) == data) return event::none;  // wait for more
    state_ = 3;
    if (data.substr(0, ec2.size()) == ec2) consumed = ec2.size();
    return event::framed;
  }
  auto marker = markers[state_];
  auto pos = data.find(marker);
  auto keep_noise = [&](std::string_view s) {
    if (noise_.size() < 4096) noise_.append(s.substr(0, 4096 - noise_.size()));
  };
  if (pos == std::string_view::npos) {
    // Keep a possible marker prefix at the end; everything before it is noise.
    std::size_t drop = data.size() > marker.size() ? data.size() - marker.size() : 0;
    keep_noise(data.substr(0, drop));
    tail_ = std::string(data.substr(drop));
    consumed = drop;
    return event::none;
  }
  keep_noise(data.substr(0, pos));
  tail_.clear();
  consumed = pos + marker.size();
  return state_++ == 0 ? event::stage1_ready : event::agent_ready;
}

// --- boot_state -------------------------------------------------------------

void boot_state::finish(bool success, std::error_code e, std::string w) {
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

void boot_state::set_phase(std::string p) {
  std::lock_guard lk(mu);
  phase = std::move(p);
}

void boot_state::set_note(std::string n) {
  std::lock_guard lk(mu);
  note = std::move(n);
}

void boot_state::set_exit_status(int status) {
  {
    std::lock_guard lk(mu);
    std::string what;
    if (WIFEXITED(status)) {
      what = "the child exited with status " + std::to_string(WEXITSTATUS(status));
    } else if (WIFSIGNALED(status)) {
      const char* sig = ::sigabbrev_np(WTERMSIG(status));
      what = sig ? std::string("the child was killed by SIG") + sig
                 : "the child was killed by signal " + std::to_string(WTERMSIG(status));
    }
    if (!what.empty()) note = note.empty() ? what : note + "; " + what;
    status_known = true;
  }
  cv.notify_all();
}

bool boot_state::add_stderr(std::string_view bytes) {
  std::lock_guard lk(mu);
  // After a failed start the last words still go into its error message.
  if (done && ok) return false;
  if (stderr_text.size() < 16384) stderr_text.append(bytes.substr(0, 16384 - stderr_text.size()));
  return true;
}

void boot_state::stderr_closed() {
  {
    std::lock_guard lk(mu);
    stderr_eof = true;
  }
  cv.notify_all();
}

// --- stderr -------------------------------------------------------------------

void stderr_sink::feed(std::string_view bytes) {
  if (closed_) return;
  // While booting, the text goes into the error message of a failed start, or is
  // logged once the start succeeded (run_bootstrap): here only at debug, so that
  // it is shown once.
  booting_ = boot_->add_stderr(bytes);
  line_.append(bytes);
  std::size_t pos;
  while ((pos = line_.find('\n')) != std::string::npos) {
    if (booting_)
      spdlog::debug("[{}] stderr: {}", name_, line_.substr(0, pos));
    else
      spdlog::warn("[{}] stderr: {}", name_, line_.substr(0, pos));
    line_.erase(0, pos + 1);
  }
}

void stderr_sink::close() {
  if (closed_) return;
  closed_ = true;
  if (!line_.empty()) {
    if (booting_)
      spdlog::debug("[{}] stderr: {}", name_, line_);
    else
      spdlog::warn("[{}] stderr: {}", name_, line_);
  }
  line_.clear();
  boot_->stderr_closed();
}

namespace {

struct stderr_reader : std::enable_shared_from_this<stderr_reader> {
  boost::asio::posix::stream_descriptor d;
  stderr_sink sink;
  char buf[4096];
  stderr_reader(boost::asio::io_context& io, int fd, std::shared_ptr<boot_state> b, std::string n)
      : d(io, fd), sink(std::move(b), std::move(n)) {}
  void start() {
    d.async_read_some(boost::asio::buffer(buf),
                      [self = shared_from_this()](const boost::system::error_code& ec, std::size_t n) {
                        if (ec) {
                          self->sink.close();
                          return;
                        }
                        self->sink.feed({self->buf, n});
                        self->start();
                      });
  }
};

}  // namespace

void start_stderr_reader(boost::asio::io_context& io, int fd, std::shared_ptr<boot_state> boot, std::string name) {
  auto rd = std::make_shared<stderr_reader>(io, fd, std::move(boot), std::move(name));
  boost::asio::post(io, [rd] { rd->start(); });
}

void check_can_connect(router& r, const char* method) {
  auto& b = r.get_broker();
  if (b->on_broker_thread())
    throw error(std::string("mitogen: ") + method + "() must not be called on the broker thread");
  if (r.is_shut_down() || b->shutting_down())
    throw stream_error(make_error_code(errc::broker_shut_down), "mitogen: the router has been shut down");
}

// --- run_bootstrap --------------------------------------------------------------

context run_bootstrap(router& r, boot_request req) {
  auto b = r.get_broker();
  const connect_options& o = *req.opts;
  auto boot = req.boot;
  auto s = req.s;
  const std::uint32_t id = req.id;

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_ms = [t0] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  };
  spdlog::debug("mitogen: starting context {} ({}), title mitogen:{}", id, req.name, req.remote_name);
  if (req.teardown) r.add_teardown(id, std::move(req.teardown));
  r.add_route(id, req.name, s);
  // Fails the bootstrap when the stream dies before MITO001.
  const std::uint32_t watch = r.add_handler(
      [boot](wire::message&& m) { boot->finish(false, make_error_code(errc::child_died), m.data); },
      {.handle = 0, .persist = false, .respondent = id});

  agent_config cfg{id, {r.context_id()}, req.remote_name, o.debug, o.log_level, o.max_message_size};
  auto scanner = std::make_shared<marker_scanner>();
  std::weak_ptr<stream> weak_s = s;
  s->start([scanner, cfg, weak_s, boot, custom = std::move(req.preamble)](std::string_view data,
                                                                         bool& framed) -> std::size_t {
    std::size_t total = 0;
    for (;;) {
      std::size_t used = 0;
      auto ev = scanner->scan(data.substr(total), used);
      total += used;
      if (ev == marker_scanner::event::none) return total;
      if (ev == marker_scanner::event::stage1_ready) {
        if (auto s = weak_s.lock()) s->send_raw(custom ? *custom : preamble(cfg));
        continue;
      }
      if (ev == marker_scanner::event::agent_ready) {
        boot->finish(true);
        continue;
      }
      framed = true;  // event::framed: the rest is frames
      return total;
    }
  });

  auto timer = std::make_shared<boost::asio::steady_timer>(b->io());
  b->defer([timer, boot, timeout = o.connect_timeout] {
    timer->expires_after(timeout);
    timer->async_wait([boot](const boost::system::error_code& ec) {
      if (!ec) boot->finish(false, make_error_code(connect_errc::connect_timeout), "connect timeout");
    });
  });

  std::unique_lock lk(boot->mu);
  boot->cv.wait(lk, [&] { return boot->done; });
  if (boot->ok) {
    // What it wrote on stderr while booting (logged at debug meanwhile): shown
    // now, once, as a warning.
    std::string said = std::move(boot->stderr_text);
    lk.unlock();
    spdlog::debug("mitogen: context {} ({}) booted in {} ms", id, req.name, elapsed_ms());
    for (std::size_t at = 0; at < said.size();) {
      auto end = said.find('\n', at);
      if (end == std::string::npos) end = said.size();
      if (end > at) spdlog::warn("[{}] stderr: {}", req.name, said.substr(at, end - at));
      at = end + 1;
    }
    b->defer([timer] { timer->cancel(); });
    r.del_handler(watch);
    return context(r.shared_from_this(), id, req.name);
  }
  lk.unlock();
  // Stop the scanner before reading its noise (it runs on the broker thread).
  b->defer_sync([&] { s->close(boot->ec, "bootstrap failed"); });
  lk.lock();
  // Give the last words on stderr a moment to arrive: they say what went wrong.
  // And for how the process ended, when it reports that (local children).
  boot->cv.wait_for(lk, std::chrono::milliseconds(300),
                    [&] { return boot->stderr_eof && (!boot->wants_status || boot->status_known); });
  std::string msg = "mitogen: context '" + req.name + "' failed to start: ";
  auto ec = boot->ec;
  if (req.classify) ec = req.classify(ec, boot->stderr_text);
  if (std::string d; ec != boot->ec && req.describe && !(d = req.describe(ec)).empty()) {
    msg += d;
  } else if (boot->ec == connect_errc::connect_timeout) {
    msg += "no bootstrap within " + std::to_string(o.connect_timeout.count()) + " ms";
    if (!boot->phase.empty()) msg += " (while " + boot->phase + ")";
  } else {
    msg += boot->why;
  }
  if (!boot->note.empty()) msg += "; " + boot->note;
  if (!boot->stderr_text.empty()) msg += "; stderr: " + boot->stderr_text;
  if (!scanner->noise().empty()) msg += "; stdout: " + scanner->noise();
  lk.unlock();
  b->defer([timer] { timer->cancel(); });
  r.del_handler(watch);
  spdlog::debug("mitogen: context {} ({}) failed to start after {} ms", id, req.name, elapsed_ms());
  throw stream_error(ec, msg);
}

}  // namespace mitogen::detail
