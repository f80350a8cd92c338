// sudo(), su(), doas(): local() through a privilege-changing program, with a
// terminal for its password prompt ("hybrid TTY", as upstream Mitogen does it).
//
// The child's stdin/stdout are the protocol pipes and its stderr the usual boot-time
// stderr pipe; a new pseudo-terminal is its controlling terminal. sudo and doas write
// their prompt to /dev/tty (that terminal) and read the answer from it; Linux su
// (PAM's misc_conv) writes it to stderr and reads stdin. A watcher on the broker
// thread reads both the terminal and stderr, recognises prompts and failure messages
// and answers a prompt on the channel it came from: the terminal, or stdin for a
// prompt on stderr. After the bootstrap it keeps draining both (no matching).
#include "mitogen/context/become.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

#include "bootstrap.hpp"
#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "process.hpp"
#include "via.hpp"

namespace mitogen {
namespace {

/// The options a become method's agent-side twin (core/agent/via/30_become.py, _spawn_sudo/_su/_doas)
/// takes, for via=. The password travels as a Secret inside the call that starts
/// the child, over the already-established connection; it is never logged. The
/// prompt and failure texts are always sent (the user's, else become_defaults()):
/// the agent keeps no table of its own, so there is one list to maintain.
wire::dict become_via_options(const become_options& o, const std::string& method) {
  wire::dict d;
  auto put = [&](const char* k, wire::value v) { d.items.emplace_back(wire::str{k}, std::move(v)); };
  auto list = [](const std::vector<std::string>& v) {
    wire::list l;
    for (const auto& s : v) l.items.emplace_back(wire::str{s});
    return l;
  };
  if (o.username) put("username", wire::str{*o.username});
  if (o.password) put("password", wire::secret{*o.password});
  const become_patterns defaults = become_defaults(method);
  auto either = [](const std::vector<std::string>& mine, const std::vector<std::string>& dflt) {
    return mine.empty() ? dflt : mine;
  };
  put("password_prompts", list(either(o.password_prompts, defaults.password_prompts)));
  put("incorrect_prompts", list(either(o.incorrect_prompts, defaults.incorrect_prompts)));
  put("not_allowed_prompts", list(either(o.not_allowed_prompts, defaults.not_allowed_prompts)));
  put("password_required", list(defaults.password_required));
  return d;
}

void check_password(const become_options& o, const std::string& method) {
  // The answer is one line: a line break inside would answer the next prompt too.
  if (o.password && o.password->find_first_of("\r\n") != std::string::npos)
    throw error("mitogen: " + method + ": the password must not contain a line break");
}

std::string lower_ascii(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

/// The first of `needles` (lower-cased) found in `hay_lower`, or nullptr.
const std::string* find_any(const std::string& hay_lower, const std::vector<std::string>& needles) {
  for (const auto& n : needles)
    if (!n.empty() && hay_lower.find(n) != std::string::npos) return &n;
  return nullptr;
}

std::vector<std::string> lowered(const std::vector<std::string>& v) {
  std::vector<std::string> out;
  for (const auto& s : v) out.push_back(lower_ascii(s));
  return out;
}

using detail::python_argv;
using detail::sh_quote;

/// The interpreter command: python -c <stage 1 one-liner> mitogen:<name>. The
/// one-liner survives the shell of `sudo -i` and `su -c`; the last argument puts the
/// context's name on its command line (ps, pgrep -f).
std::vector<std::string> python_command(const connect_options& o, const std::string& remote_name) {
  auto argv = python_argv(o.python_path);
  argv.push_back("-c");
  argv.push_back(detail::stage1_oneliner());
  argv.push_back("mitogen:" + remote_name);
  return argv;
}

constexpr std::size_t max_line = 4096;  // a child's line longer than this is cut
constexpr std::size_t max_tty_note = 2048;

/// Reads the child's terminal and stderr on the broker thread; during the bootstrap
/// it answers the password prompt once and turns failure messages into error codes.
class become_watcher : public std::enable_shared_from_this<become_watcher> {
 public:
  struct config {
    std::string method;  ///< "sudo", "su", "doas"
    std::string target;  ///< target user, for messages
    std::string name;    ///< context name, for logs
    std::optional<std::string> password;
    become_patterns pats;  ///< lower-cased
  };

  become_watcher(boost::asio::io_context& io, detail::spawned_tty& child, std::shared_ptr<detail::boot_state> boot,
                 config cfg)
      : tty_(io, child.tty_master), err_(io, child.stderr_r), slave_fd_(child.tty_slave), boot_(boot),
        sink_(boot, cfg.name), cfg_(std::move(cfg)) {}

  ~become_watcher() {
    if (slave_fd_ >= 0) ::close(slave_fd_);
    scrub_password();
  }

  /// The stream to answer stderr prompts on (the child's stdin). Before start().
  void set_stream(std::weak_ptr<stream> s) { stdin_ = std::move(s); }

  /// Post the first reads. Any thread.
  void start() {
    boost::asio::post(tty_.get_executor(), [self = shared_from_this()] {
      self->read(self->tty_, self->tty_buf_, true);
      self->read(self->err_, self->err_buf_, false);
    });
  }

  /// The bootstrap finished (either way): stop matching and forget the password.
  /// Our descriptor on the terminal's slave side stays open until close_tty(): with
  /// no slave side open the master reads EIO, reading stops, and a later writer to
  /// /dev/tty (a program the context runs) would block once the buffer is full.
  /// Broker thread.
  void bootstrap_over() {
    matching_ = false;
    scrub_password();
    std::fill(shown_password_.begin(), shown_password_.end(), '\0');
    shown_password_.clear();
  }

  /// The child is going: close the terminal (SIGHUP to a child still waiting for a
  /// password) and stop reading it. stderr is read on until EOF. Broker thread.
  void close_tty() {
    bootstrap_over();
    if (slave_fd_ >= 0) ::close(slave_fd_);
    slave_fd_ = -1;
    boost::system::error_code ignored;
    tty_.close(ignored);
  }

  /// Maps a failure of the bootstrap that raced our reading (the child wrote "not in
  /// the sudoers file" and exited; the stream's EOF won) to our codes, from the final
  /// stderr text. Any thread (reads only the immutable config and an atomic).
  std::error_code classify(std::error_code ec, const std::string& stderr_text) const {
    if (ec == connect_errc::connect_timeout || ec.category() != mitogen_category()) return ec;
    if (ec != errc::child_died && ec != connect_errc::bootstrap_failed) return ec;
    auto low = lower_ascii(stderr_text);
    if (find_any(low, cfg_.pats.not_allowed_prompts)) return make_error_code(connect_errc::become_not_allowed);
    if (find_any(low, cfg_.pats.password_required)) return make_error_code(connect_errc::become_password_required);
    if (sent_.load() && find_any(low, cfg_.pats.incorrect_prompts)) return make_error_code(connect_errc::become_password_wrong);
    return ec;
  }

  std::string describe(std::error_code ec) const {
    if (ec == connect_errc::become_not_allowed)
      return cfg_.method + " refused: this user may not become " + cfg_.target + " (no " +
             (cfg_.method == "doas" ? "doas.conf" : cfg_.method == "su" ? "su" : "sudoers") + " rule allows it)";
    if (ec == connect_errc::become_password_required)
      return cfg_.method + " password is required to become " + cfg_.target + ", and none was given";
    if (ec == connect_errc::become_password_wrong) return cfg_.method + " password is incorrect (becoming " + cfg_.target + ")";
    return {};
  }

 private:
  using descriptor = boost::asio::posix::stream_descriptor;

  void read(descriptor& d, std::array<char, 4096>& buf, bool tty) {
    d.async_read_some(boost::asio::buffer(buf), [self = shared_from_this(), &d, &buf, tty](
                                                    const boost::system::error_code& ec, std::size_t n) {
      if (ec) {  // EOF; EIO: nobody has the terminal open any more; closed
        self->flush(tty);
        return;
      }
      self->feed(tty, {buf.data(), n});
      self->read(d, buf, tty);
    });
  }

  void scrub_password() {
    if (cfg_.password) {
      std::fill(cfg_.password->begin(), cfg_.password->end(), '\0');
      cfg_.password.reset();
    }
  }

  /// Replace any echo of the password (a terminal whose echo the child turned back
  /// on) before text leaves this object.
  std::string scrubbed(std::string s) const {
    if (!shown_password_.empty())
      for (std::size_t p; (p = s.find(shown_password_)) != std::string::npos;) s.replace(p, shown_password_.size(), "********");
    return s;
  }

  void feed(bool tty, std::string_view bytes) {
    std::string& pending = tty ? tty_line_ : err_line_;
    pending.append(bytes);
    std::size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      while (!line.empty() && line.back() == '\r') line.pop_back();
      if (matching_) match_line(line, tty);
      emit(tty, line, true);
    }
    if (pending.size() > max_line) {
      emit(tty, pending, false);
      pending.clear();
    }
    if (matching_ && !pending.empty()) match_partial(pending, tty);
    if (tty && matching_) update_note(pending);
  }

  /// The terminal's text so far (with the unfinished line: an unanswered prompt) goes
  /// into the error message.
  void update_note(const std::string& pending) {
    std::string text = tty_note_;
    std::string tail = scrubbed(pending);
    tail.erase(std::remove(tail.begin(), tail.end(), '\r'), tail.end());
    if (!tail.empty()) {
      text += (text.empty() ? "" : " / ") + tail.substr(0, max_tty_note);
      // Only an unrecognised prompt stays unfinished for long: say what would help.
      if (!sent_.load()) text += " (not recognised as a password prompt: see password_prompts)";
    }
    if (!text.empty()) boot_->set_note("terminal: " + text);
  }

  void flush(bool tty) {
    std::string& pending = tty ? tty_line_ : err_line_;
    if (!pending.empty()) {
      if (matching_) match_line(pending, tty);
      emit(tty, pending, false);
      pending.clear();
    }
    if (!tty) sink_.close();
  }

  /// A line (or a cut part of one) leaves: stderr to the boot stderr sink (logged,
  /// kept for the error message), terminal text to the debug log and the note.
  void emit(bool tty, const std::string& raw, bool newline) {
    std::string text = scrubbed(raw);
    if (!tty) {
      sink_.feed(text + (newline ? "\n" : ""));
      return;
    }
    // The terminal carries prompts: debug only, and without \r (doas starts with one).
    std::string clean;
    for (char c : text)
      if (c != '\r') clean += c;
    if (clean.empty()) return;
    spdlog::debug("[{}] tty: {}", cfg_.name, clean);
    if (matching_ && tty_note_.size() < max_tty_note) {
      tty_note_ += (tty_note_.empty() ? "" : " / ") + clean.substr(0, max_tty_note - tty_note_.size());
      update_note({});
    }
  }

  void fail(std::error_code ec, const std::string& detail) {
    std::string why = describe(ec);
    if (!detail.empty()) why += ": " + scrubbed(detail);
    matching_ = false;
    boot_->finish(false, ec, why);
  }

  bool still_booting() {
    std::lock_guard lk(boot_->mu);
    return !boot_->done;
  }

  /// A complete line: failure messages.
  void match_line(const std::string& line, bool /*tty*/) {
    if (!still_booting()) {
      matching_ = false;
      return;
    }
    auto low = lower_ascii(line);
    if (find_any(low, cfg_.pats.not_allowed_prompts)) return fail(connect_errc::become_not_allowed, line);
    if (find_any(low, cfg_.pats.password_required)) return fail(connect_errc::become_password_required, line);
    if (sent_.load() && find_any(low, cfg_.pats.incorrect_prompts)) return fail(connect_errc::become_password_wrong, line);
  }

  /// The unfinished line: a password prompt waits for its answer there.
  void match_partial(std::string& pending, bool tty) {
    if (!still_booting()) {
      matching_ = false;
      return;
    }
    auto low = lower_ascii(pending);
    if (!find_any(low, cfg_.pats.password_prompts)) return;
    std::string prompt = pending;
    pending.clear();
    // A prompt is no warning: the terminal's goes to the debug log as usual, su's
    // (on stderr) to the debug log instead of the stderr sink.
    if (tty)
      emit(tty, prompt, false);
    else
      spdlog::debug("[{}] stderr: {}", cfg_.name, scrubbed(prompt));
    if (!cfg_.password) {
      if (sent_.load()) return fail(connect_errc::become_password_wrong, "asked again: " + prompt);
      return fail(connect_errc::become_password_required, "prompt: " + prompt);
    }
    if (sent_.load()) return fail(connect_errc::become_password_wrong, "asked again: " + prompt);
    answer(tty);
  }

  void answer(bool tty) {
    std::string line = *cfg_.password + "\n";
    bool ok = false;
    if (tty) {
      // A few bytes into an empty terminal buffer: never blocks.
      ok = ::write(tty_.native_handle(), line.data(), line.size()) == static_cast<ssize_t>(line.size());
    } else if (auto s = stdin_.lock()) {
      ok = s->send_raw(line);
    }
    std::fill(line.begin(), line.end(), '\0');
    shown_password_ = *cfg_.password;
    scrub_password();  // sent once; a second prompt means it was wrong
    sent_ = true;
    spdlog::debug("[{}] answered the {} password prompt on {}", cfg_.name, cfg_.method, tty ? "the terminal" : "stdin");
    boot_->set_phase("waiting for " + cfg_.method + " to accept the password and start the interpreter");
    if (!ok) fail(errc::child_died, "could not write the password: the child went away");
  }

  descriptor tty_;
  descriptor err_;
  int slave_fd_;
  std::shared_ptr<detail::boot_state> boot_;
  detail::stderr_sink sink_;
  config cfg_;
  std::weak_ptr<stream> stdin_;
  std::array<char, 4096> tty_buf_{}, err_buf_{};
  std::string tty_line_, err_line_, tty_note_;
  std::string shown_password_;  ///< kept (after sending) only to scrub echoes
  bool matching_ = true;
  std::atomic<bool> sent_{false};
};

/// What every method shares: spawn with a terminal, watch it, bootstrap.
context become(router& r, const become_options& o, const std::string& method, const std::string& target,
               const std::vector<std::string>& argv) {
  auto b = r.get_broker();
  const std::uint32_t id = r.allocate_id();
  const std::string name = method + "." + target;
  const std::string remote_name = o.remote_name.value_or(default_remote_name());

  check_password(o, method);

  detail::spawned_tty child;
  if (auto ec = detail::spawn_with_tty(argv, argv.front(), child))
    throw stream_error(make_error_code(connect_errc::spawn_failed),
                       "mitogen: cannot start " + argv.front() + ": " + ec.message());

  auto defaults = become_defaults(method);
  become_watcher::config cfg;
  cfg.method = method;
  cfg.target = target;
  cfg.name = name;
  cfg.password = o.password;
  cfg.pats.password_prompts = lowered(o.password_prompts.empty() ? defaults.password_prompts : o.password_prompts);
  cfg.pats.incorrect_prompts = lowered(o.incorrect_prompts.empty() ? defaults.incorrect_prompts : o.incorrect_prompts);
  cfg.pats.not_allowed_prompts =
      lowered(o.not_allowed_prompts.empty() ? defaults.not_allowed_prompts : o.not_allowed_prompts);
  cfg.pats.password_required = lowered(defaults.password_required);

  auto boot = std::make_shared<detail::boot_state>();
  boot->set_phase("waiting for " + method + ": no recognised password prompt and no interpreter yet");
  auto w = std::make_shared<become_watcher>(b->io(), child, boot, std::move(cfg));

  detail::boot_request req;
  req.id = id;
  req.name = name;
  req.remote_name = remote_name;
  req.s = stream::create(b, child.stdout_r, child.stdin_w,
                         {.name = name, .max_message_size = o.max_message_size, .leader_reads = true});
  req.boot = boot;
  req.opts = &o;
  w->set_stream(req.s);
  w->start();
  // Close the terminal first: a child still blocked on its password prompt gets
  // SIGHUP and goes at once instead of waiting for the grace period's SIGKILL.
  req.teardown = [b, w, pid = child.pid](std::function<void()> done) {
    w->close_tty();
    detail::reap_child(b, pid, std::chrono::milliseconds(1000), std::move(done));
  };
  req.classify = [w](std::error_code ec, const std::string& err) { return w->classify(ec, err); };
  req.describe = [w](std::error_code ec) { return w->describe(ec); };
  try {
    context c = detail::run_bootstrap(r, std::move(req));
    b->defer([w] { w->bootstrap_over(); });
    return c;
  } catch (...) {
    b->defer([w] { w->bootstrap_over(); });
    throw;
  }
}

[[noreturn]] void bad_sudo_arg(const std::string& arg, const std::string& why) {
  throw stream_error(make_error_code(connect_errc::spawn_failed),
                     "mitogen: sudo: " + why + " '" + arg +
                         "' in sudo_args (supported: -E -H -i -u USER -r ROLE -t TYPE and their long forms; "
                         "-S and -n are ignored)");
}

/// sudo_args folded into the options, as upstream parses them.
sudo_options parse_sudo_args(sudo_options o) {
  const auto& a = o.sudo_args;
  std::optional<std::string> user;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const std::string& arg = a[i];
    auto value = [&](const std::string& opt) -> std::string {
      if (i + 1 >= a.size()) bad_sudo_arg(opt, "missing value for");
      return a[++i];
    };
    if (arg.rfind("--", 0) == 0) {
      auto eq = arg.find('=');
      std::string key = arg.substr(0, eq);
      auto val = [&] { return eq != std::string::npos ? arg.substr(eq + 1) : value(key); };
      if (key == "--preserve-env" && eq == std::string::npos) o.preserve_env = true;
      else if (key == "--set-home" && eq == std::string::npos) o.set_home = true;
      else if (key == "--login" && eq == std::string::npos) o.login = true;
      else if ((key == "--stdin" || key == "--non-interactive") && eq == std::string::npos) continue;
      else if (key == "--user") user = val();
      else if (key == "--role") o.selinux_role = val();
      else if (key == "--type") o.selinux_type = val();
      else bad_sudo_arg(arg, "unsupported option");
      continue;
    }
    if (arg.size() < 2 || arg[0] != '-') bad_sudo_arg(arg, "unsupported argument");
    // Short options, possibly bundled ("-HSn"); one taking a value ends the bundle.
    for (std::size_t k = 1; k < arg.size(); ++k) {
      char c = arg[k];
      if (c == 'E') o.preserve_env = true;
      else if (c == 'H') o.set_home = true;
      else if (c == 'i') o.login = true;
      else if (c == 'S' || c == 'n') continue;
      else if (c == 'u' || c == 'r' || c == 't') {
        std::string v = k + 1 < arg.size() ? arg.substr(k + 1) : value(std::string("-") + c);
        (c == 'u' ? user : c == 'r' ? o.selinux_role : o.selinux_type) = v;
        break;
      } else {
        bad_sudo_arg(std::string("-") + c, "unsupported option");
      }
    }
  }
  // An explicit username wins over sudo_args' -u, as upstream.
  if (!o.username) o.username = user;
  o.sudo_args.clear();
  return o;
}

}  // namespace

become_patterns become_defaults(const std::string& method) {
  become_patterns p;
  // "password" in the languages sudo and PAM are translated to most often (the texts
  // upstream Mitogen recognises, from sudo's .po files), plus "Password:" (doas, su).
  p.password_prompts = {
      "password",    "passwort",     "mot de passe", "contraseña",   "contrasenya", "senha",
      "wachtwoord",  "lösenord",     "adgangskode",  "passord",      "salasana",    "hasło",
      "heslo",       "jelszó",       "parola",       "parool",       "lozinka",     "sandi",
      "пароль",      "парола",       "密码",         "密碼",         "パスワード",  "암호",
      "συνθηματικό", "סיסמה",        "كلمة السر",    "mật khẩu",
  };
  if (method == "sudo") {
    p.incorrect_prompts = {"sorry, try again", "incorrect password", "authentication failure"};
    p.not_allowed_prompts = {"is not in the sudoers file", "is not allowed to execute", "may not run sudo",
                             "is not allowed to run sudo"};
    p.password_required = {"a password is required", "no askpass program specified"};
  } else if (method == "su") {
    p.incorrect_prompts = {"su: sorry", "su: authentication failure", "su: incorrect password",
                           "authentication is denied"};
    p.not_allowed_prompts = {"su: permission denied", "su: you are not authorized"};
  } else if (method == "doas") {
    p.incorrect_prompts = {"doas: authentication failed", "doas: authorization failed"};
    p.not_allowed_prompts = {"doas: operation not permitted"};
    p.password_required = {"doas: a password is required"};
  }
  return p;
}

std::vector<std::string> sudo_command(const sudo_options& in, const std::vector<std::string>& python) {
  sudo_options o = parse_sudo_args(in);
  std::vector<std::string> argv = {o.sudo_path, "-u", o.username.value_or("root")};
  if (o.preserve_env) argv.push_back("-E");
  if (o.set_home) argv.push_back("-H");
  if (o.login) argv.push_back("-i");
  if (o.selinux_role) argv.insert(argv.end(), {"-r", *o.selinux_role});
  if (o.selinux_type) argv.insert(argv.end(), {"-t", *o.selinux_type});
  argv.push_back("--");
  argv.insert(argv.end(), python.begin(), python.end());
  return argv;
}

context sudo(router& r, const sudo_options& opts) {
  detail::check_can_connect(r, "sudo");
  sudo_options o = parse_sudo_args(opts);
  const std::string target = o.username.value_or("root");
  if (o.via) {
    check_password(o, "sudo");
    auto d = become_via_options(o, "sudo");
    d.items.emplace_back(wire::str{"sudo_path"}, wire::str{o.sudo_path});
    for (auto [k, on] : {std::pair{"preserve_env", o.preserve_env}, {"set_home", o.set_home}, {"login", o.login}})
      if (on) d.items.emplace_back(wire::str{k}, true);
    if (o.selinux_role) d.items.emplace_back(wire::str{"selinux_role"}, wire::str{*o.selinux_role});
    if (o.selinux_type) d.items.emplace_back(wire::str{"selinux_type"}, wire::str{*o.selinux_type});
    return detail::connect_via(r, o, "sudo", std::move(d));
  }
  auto argv = sudo_command(o, python_command(o, o.remote_name.value_or(default_remote_name())));
  return become(r, o, "sudo", target, argv);
}

context su(router& r, const su_options& o) {
  detail::check_can_connect(r, "su");
  const std::string target = o.username.value_or("root");
  if (o.via) {
    check_password(o, "su");
    auto d = become_via_options(o, "su");
    d.items.emplace_back(wire::str{"su_path"}, wire::str{o.su_path});
    return detail::connect_via(r, o, "su", std::move(d));
  }
  // su runs its argument through the target's shell.
  std::string cmd;
  for (const auto& a : python_command(o, o.remote_name.value_or(default_remote_name())))
    cmd += (cmd.empty() ? "" : " ") + sh_quote(a);
  return become(r, o, "su", target, {o.su_path, target, "-c", cmd});
}

context doas(router& r, const doas_options& o) {
  detail::check_can_connect(r, "doas");
  const std::string target = o.username.value_or("root");
  if (o.via) {
    check_password(o, "doas");
    auto d = become_via_options(o, "doas");
    d.items.emplace_back(wire::str{"doas_path"}, wire::str{o.doas_path});
    return detail::connect_via(r, o, "doas", std::move(d));
  }
  std::vector<std::string> argv = {o.doas_path, "-u", target, "--"};
  auto py = python_command(o, o.remote_name.value_or(default_remote_name()));
  argv.insert(argv.end(), py.begin(), py.end());
  return become(r, o, "doas", target, argv);
}

}  // namespace mitogen
