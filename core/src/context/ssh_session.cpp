#include "ssh_session.hpp"

#include <fcntl.h>
#include <libssh2.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <spdlog/spdlog.h>

#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"

namespace mitogen::detail {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using asio::awaitable;
using asio::use_awaitable;
using clk = std::chrono::steady_clock;

namespace {

void init_libssh2_once() {
  static const int rc = libssh2_init(0);
  (void)rc;
}

/// Wait until `s` is readable or writable, whichever comes first (libssh2 may be
/// blocked in both directions at once). The losing wait completes later and is ignored.
template <class Token>
auto async_wait_any(tcp::socket& s, Token&& token) {
  return asio::async_initiate<Token, void(boost::system::error_code)>(
      [&s](auto handler) {
        using handler_t = decltype(handler);
        auto slot = std::make_shared<std::optional<handler_t>>(std::move(handler));
        auto fire = [slot](const boost::system::error_code& ec) {
          if (!*slot) return;
          handler_t h = std::move(**slot);
          slot->reset();
          std::move(h)(ec);
        };
        s.async_wait(tcp::socket::wait_read, fire);
        s.async_wait(tcp::socket::wait_write, fire);
      },
      token);
}

const char* key_type_name(int type) {
  switch (type) {
    case LIBSSH2_HOSTKEY_TYPE_RSA: return "RSA";
    case LIBSSH2_HOSTKEY_TYPE_DSS: return "DSA";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_256:
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_384:
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_521: return "ECDSA";
    case LIBSSH2_HOSTKEY_TYPE_ED25519: return "ED25519";
  }
  return "unknown";
}

int knownhost_key_bits(int type) {
  switch (type) {
    case LIBSSH2_HOSTKEY_TYPE_RSA: return LIBSSH2_KNOWNHOST_KEY_SSHRSA;
    case LIBSSH2_HOSTKEY_TYPE_DSS: return LIBSSH2_KNOWNHOST_KEY_SSHDSS;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_256: return LIBSSH2_KNOWNHOST_KEY_ECDSA_256;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_384: return LIBSSH2_KNOWNHOST_KEY_ECDSA_384;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_521: return LIBSSH2_KNOWNHOST_KEY_ECDSA_521;
    case LIBSSH2_HOSTKEY_TYPE_ED25519: return LIBSSH2_KNOWNHOST_KEY_ED25519;
  }
  return LIBSSH2_KNOWNHOST_KEY_UNKNOWN;
}

bool file_exists(const std::string& p) { return ::access(p.c_str(), F_OK) == 0; }

struct knownhosts_deleter {
  void operator()(LIBSSH2_KNOWNHOSTS* k) const { libssh2_knownhost_free(k); }
};

/// OpenSSH's order (ed25519 first): known_hosts files are mostly written by OpenSSH,
/// so negotiating the key type it would have stored avoids a false "unknown host".
/// TODO(feature): prefer the types already recorded for this host, as OpenSSH does.
constexpr const char* hostkey_methods =
    "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256,ssh-rsa";

/// Only what this libssh2 supports: libssh2_session_method_pref() strips unknown names
/// with an overlapping memcpy (libssh2 1.10).
void set_hostkey_preference(LIBSSH2_SESSION* s) {
  const char** algs = nullptr;
  int n = libssh2_session_supported_algs(s, LIBSSH2_METHOD_HOSTKEY, &algs);
  if (n <= 0) return;
  std::string pref;
  std::string_view want = hostkey_methods;
  while (!want.empty()) {
    auto c = want.find(',');
    std::string_view m = want.substr(0, c);
    for (int i = 0; i < n; ++i)
      if (m == algs[i]) pref += (pref.empty() ? "" : ",") + std::string(m);
    want = c == std::string_view::npos ? std::string_view{} : want.substr(c + 1);
  }
  libssh2_free(s, algs);
  if (!pref.empty()) libssh2_session_method_pref(s, LIBSSH2_METHOD_HOSTKEY, pref.c_str());
}

constexpr std::size_t bridge_chunk = 256 * 1024;

/// Where the pump reads (the broker thread's; the first half for bridge -> channel,
/// the second for channel -> bridge): an idle session holds no buffer of its own.
char* pump_scratch() {
  thread_local std::unique_ptr<char[]> buf(new char[2 * bridge_chunk]);
  return buf.get();
}

/// After a write from `p`, `len` bytes are left: keep them in `v` (from offset
/// `off`) unless they are there already; nothing left releases `v`.
void keep_unsent(std::vector<char>& v, std::size_t& off, const char* p, std::size_t len) {
  if (len == 0) {
    std::vector<char>().swap(v);
    off = 0;
  } else if (!v.empty() && p >= v.data() && p < v.data() + v.size()) {
    off = static_cast<std::size_t>(p - v.data());
  } else {
    v.assign(p, p + len);
    off = 0;
  }
}

}  // namespace

class ssh_session : public std::enable_shared_from_this<ssh_session> {
 public:
  ssh_session(std::shared_ptr<broker> b, ssh_target t, int bridge_fd, std::shared_ptr<boot_state> boot)
      : broker_(std::move(b)),
        t_(std::move(t)),
        boot_(std::move(boot)),
        sock_(broker_->io()),
        bridge_(broker_->io(), bridge_fd),
        keepalive_(broker_->io()),
        linger_(broker_->io()),
        stderr_(boot_, t_.name) {}

  ~ssh_session() { free_libssh2(); }

  awaitable<void> run(std::shared_ptr<ssh_session> self);
  void close(const std::string& why);

 private:
  awaitable<bool> wait_socket();
  template <class F>
  awaitable<int> retry(F f);
  using failure = std::optional<std::pair<std::error_code, std::string>>;
  bool check_host_key();
  failure verify_host_key();
  failure append_known_host(LIBSSH2_KNOWNHOSTS* kh, const std::string& entry, const char* key, std::size_t len,
                            int typemask);
  awaitable<bool> authenticate();
  void fail(std::error_code e, std::string why);
  std::string last_error() const;
  std::string where() const { return t_.user + "@" + t_.host + ":" + std::to_string(t_.port); }
  void free_libssh2();

  // The bridge (after exec).
  void pump();
  bool pump_once(bool& fatal);
  void arm_socket(bool write);
  void arm_bridge(bool write);
  void lost(const std::string& why);
  void read_stderr_now();
  bool booted();
  void remote_eof();
  void finish_eof(bool channel_closed);
  void keepalive_tick();

  static void kbd_callback(const char* name, int name_len, const char* instruction, int instruction_len,
                           int num_prompts, const LIBSSH2_USERAUTH_KBDINT_PROMPT* prompts,
                           LIBSSH2_USERAUTH_KBDINT_RESPONSE* responses, void** abstract);

  std::shared_ptr<broker> broker_;
  ssh_target t_;
  std::shared_ptr<boot_state> boot_;
  tcp::socket sock_;
  asio::posix::stream_descriptor bridge_;
  asio::steady_timer keepalive_;
  asio::steady_timer linger_;
  stderr_sink stderr_;
  LIBSSH2_SESSION* session_ = nullptr;
  LIBSSH2_CHANNEL* channel_ = nullptr;
  LIBSSH2_AGENT* agent_ = nullptr;
  bool closed_ = false;
  bool handshaken_ = false;
  int kbd_rounds_ = 0;

  // Pump state (broker thread).
  // What one direction could not write yet (channel -> bridge, bridge -> channel):
  // empty, and released, whenever everything read was written.
  std::vector<char> down_, up_;
  std::size_t down_off_ = 0, down_len_ = 0, up_off_ = 0, up_len_ = 0;
  bool chan_eof_ = false, bridge_eof_ = false, draining_ = false;
  bool sock_rd_ = false, sock_wr_ = false, br_rd_ = false, br_wr_ = false, pump_posted_ = false;
  clk::time_point last_rx_;
};

// --- setup ----------------------------------------------------------------------

std::string ssh_session::last_error() const {
  if (!session_) return "session closed";
  char* msg = nullptr;
  int len = 0;
  libssh2_session_last_error(session_, &msg, &len, 0);
  return msg && len > 0 ? std::string(msg, static_cast<std::size_t>(len)) : "unknown libssh2 error";
}

void ssh_session::fail(std::error_code e, std::string why) {
  if (closed_) return;
  boot_->finish(false, e, why);
  close(why);
}

awaitable<bool> ssh_session::wait_socket() {
  if (closed_) co_return false;
  const int dir = libssh2_session_block_directions(session_);
  boost::system::error_code ec;
  if (dir == LIBSSH2_SESSION_BLOCK_OUTBOUND)
    co_await sock_.async_wait(tcp::socket::wait_write, asio::redirect_error(use_awaitable, ec));
  else if (dir == LIBSSH2_SESSION_BLOCK_INBOUND || dir == 0)
    co_await sock_.async_wait(tcp::socket::wait_read, asio::redirect_error(use_awaitable, ec));
  else
    co_await async_wait_any(sock_, asio::redirect_error(use_awaitable, ec));
  co_return !ec && !closed_;
}

template <class F>
awaitable<int> ssh_session::retry(F f) {
  for (;;) {
    if (closed_) co_return LIBSSH2_ERROR_SOCKET_DISCONNECT;
    int rc = f();
    if (rc != LIBSSH2_ERROR_EAGAIN) co_return rc;
    if (!co_await wait_socket()) co_return LIBSSH2_ERROR_SOCKET_DISCONNECT;
  }
}

awaitable<void> ssh_session::run(std::shared_ptr<ssh_session> self) {
  try {
    boost::system::error_code ec;
    boot_->set_phase("resolving " + t_.host);
    tcp::resolver resolver(broker_->io());
    auto endpoints =
        co_await resolver.async_resolve(t_.host, std::to_string(t_.port), asio::redirect_error(use_awaitable, ec));
    if (closed_) co_return;
    if (ec) co_return fail(connect_errc::host_unreachable, "cannot resolve " + t_.host + ": " + ec.message());

    boot_->set_phase("connecting to " + t_.host + " port " + std::to_string(t_.port));
    co_await asio::async_connect(sock_, endpoints, asio::redirect_error(use_awaitable, ec));
    if (closed_) co_return;
    if (ec)
      co_return fail(connect_errc::host_unreachable,
                     "cannot connect to " + t_.host + " port " + std::to_string(t_.port) + ": " + ec.message());
    sock_.set_option(tcp::no_delay(true), ec);
    sock_.non_blocking(true, ec);

    init_libssh2_once();
    session_ = libssh2_session_init_ex(nullptr, nullptr, nullptr, this);
    if (!session_) co_return fail(connect_errc::bootstrap_failed, "libssh2_session_init failed");
    libssh2_session_set_blocking(session_, 0);
    set_hostkey_preference(session_);
    if (t_.compression) libssh2_session_flag(session_, LIBSSH2_FLAG_COMPRESS, 1);

    boot_->set_phase("SSH handshake with " + t_.host + " port " + std::to_string(t_.port));
    const int fd = sock_.native_handle();
    int rc = co_await retry([&] { return libssh2_session_handshake(session_, fd); });
    if (closed_) co_return;
    if (rc) co_return fail(connect_errc::host_unreachable, "SSH handshake with " + t_.host + " port " +
                                                       std::to_string(t_.port) + " failed: " + last_error());
    handshaken_ = true;
    if (!check_host_key()) co_return;

    boot_->set_phase("authenticating as " + where());
    if (!co_await authenticate()) co_return;

    boot_->set_phase("opening a session channel");
    for (;;) {
      channel_ = libssh2_channel_open_session(session_);
      if (channel_) break;
      if (libssh2_session_last_errno(session_) != LIBSSH2_ERROR_EAGAIN)
        co_return fail(connect_errc::bootstrap_failed, "cannot open an SSH session channel: " + last_error());
      if (!co_await wait_socket()) co_return;
    }
    rc = co_await retry([&] { return libssh2_channel_exec(channel_, t_.command.c_str()); });
    if (closed_) co_return;
    if (rc) co_return fail(connect_errc::bootstrap_failed, "the server refused to run the command: " + last_error());

    boot_->set_phase("starting the remote interpreter");
    last_rx_ = clk::now();
    if (t_.keepalive_interval.count() > 0) {
      libssh2_keepalive_config(session_, 1, static_cast<unsigned>(t_.keepalive_interval.count()));
      keepalive_.expires_after(t_.keepalive_interval);
      keepalive_.async_wait([self](const boost::system::error_code& e) {
        if (!e) self->keepalive_tick();
      });
    }
    pump();
  } catch (const std::exception& e) {
    fail(connect_errc::bootstrap_failed, std::string("ssh: ") + e.what());
  }
}

bool ssh_session::check_host_key() {
  // fail() frees the session: only after the known-hosts collection is gone.
  auto f = verify_host_key();
  if (f) fail(f->first, std::move(f->second));
  return !f;
}

ssh_session::failure ssh_session::verify_host_key() {
  std::size_t len = 0;
  int type = 0;
  const char* key = libssh2_session_hostkey(session_, &len, &type);
  if (!key) return failure{{connect_errc::bootstrap_failed, "the server sent no host key: " + last_error()}};
  if (t_.policy == host_key_policy::ignore) return {};
  const char* hash = libssh2_hostkey_hash(session_, LIBSSH2_HOSTKEY_HASH_SHA256);
  const std::string fp = hash ? "SHA256:" + base64({hash, 32}, false) : "(no SHA256 fingerprint)";
  const std::string desc = std::string(key_type_name(type)) + " key " + fp;
  // OpenSSH writes "[host]:port" for ports other than 22, and only checks that form.
  const std::string entry = t_.port == 22 ? t_.host : "[" + t_.host + "]:" + std::to_string(t_.port);

  std::unique_ptr<LIBSSH2_KNOWNHOSTS, knownhosts_deleter> kh(libssh2_knownhost_init(session_));
  if (!kh) return failure{{connect_errc::bootstrap_failed, "libssh2_knownhost_init failed"}};
  // Line by line: libssh2_knownhost_readfile() stops at the first line it cannot
  // parse (@cert-authority, key types it does not know), losing every later entry.
  {
    std::ifstream f(t_.known_hosts_file);
    std::string line;
    while (std::getline(f, line)) {
      if (line.empty() || line[0] == '#' || line[0] == '@') continue;
      line += '\n';
      libssh2_knownhost_readline(kh.get(), line.data(), line.size(), LIBSSH2_KNOWNHOST_FILE_OPENSSH);
    }
  }
  const int typemask = LIBSSH2_KNOWNHOST_TYPE_PLAIN | LIBSSH2_KNOWNHOST_KEYENC_RAW | knownhost_key_bits(type);
  struct libssh2_knownhost* found = nullptr;
  const int rc = libssh2_knownhost_checkp(kh.get(), entry.c_str(), -1, key, len, typemask, &found);
  switch (rc) {
    case LIBSSH2_KNOWNHOST_CHECK_MATCH: return {};
    case LIBSSH2_KNOWNHOST_CHECK_MISMATCH:
      return failure{{connect_errc::host_key_mismatch,
                      "host key verification failed: the host key of " + entry + " differs from the one in " +
                          t_.known_hosts_file + " (the server offered " + desc +
                          "). Someone may be intercepting the connection, or the host key was changed; if that "
                          "is expected, remove the old entry with: ssh-keygen -R '" +
                          entry + "' -f " + t_.known_hosts_file}};
    case LIBSSH2_KNOWNHOST_CHECK_NOTFOUND:
      if (t_.policy == host_key_policy::accept) {
        if (auto f = append_known_host(kh.get(), entry, key, len, typemask)) return f;
        spdlog::info("mitogen: added {} ({}) to {}", entry, desc, t_.known_hosts_file);
        return {};
      }
      return failure{{connect_errc::host_key_unknown, "host key verification failed: " + entry + " is not in " +
                                                  t_.known_hosts_file + " (the server offered " + desc +
                                                  "); add it, or connect with check_host_keys=accept"}};
    default:
      return failure{{connect_errc::bootstrap_failed, "cannot check the host key of " + entry + ": " + last_error()}};
  }
}

ssh_session::failure ssh_session::append_known_host(LIBSSH2_KNOWNHOSTS* kh, const std::string& entry,
                                                    const char* key, std::size_t len, int typemask) {
  struct libssh2_knownhost* added = nullptr;
  char line[16384];
  std::size_t out = 0;
  if (libssh2_knownhost_addc(kh, entry.c_str(), nullptr, key, len, nullptr, 0, typemask, &added) != 0 ||
      libssh2_knownhost_writeline(kh, added, line, sizeof line, &out, LIBSSH2_KNOWNHOST_FILE_OPENSSH) != 0)
    return failure{{connect_errc::bootstrap_failed, "cannot record the host key of " + entry + ": " + last_error()}};
  // Append one line (O_APPEND: concurrent connections do not interleave) rather than
  // rewrite the file: libssh2 would drop what it could not parse.
  auto slash = t_.known_hosts_file.rfind('/');
  if (slash != std::string::npos && slash > 0) ::mkdir(t_.known_hosts_file.substr(0, slash).c_str(), 0700);
  int fd = ::open(t_.known_hosts_file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0 || ::write(fd, line, out) != static_cast<ssize_t>(out)) {
    std::string err = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    return failure{{connect_errc::bootstrap_failed, "cannot write " + t_.known_hosts_file + ": " + err}};
  }
  ::close(fd);
  return {};
}

void ssh_session::kbd_callback(const char*, int, const char*, int, int num_prompts,
                               const LIBSSH2_USERAUTH_KBDINT_PROMPT*, LIBSSH2_USERAUTH_KBDINT_RESPONSE* responses,
                               void** abstract) {
  auto* self = static_cast<ssh_session*>(*abstract);
  // Answer every prompt with the password, once: a second round means it was refused.
  const bool answer = self->t_.password && self->kbd_rounds_++ == 0;
  for (int i = 0; i < num_prompts; ++i) {
    const std::string& pw = answer ? *self->t_.password : std::string();
    responses[i].text = static_cast<char*>(std::malloc(pw.size() + 1));  // freed by libssh2
    if (!responses[i].text) {
      responses[i].length = 0;
      continue;
    }
    std::memcpy(responses[i].text, pw.data(), pw.size() + 1);
    responses[i].length = static_cast<unsigned>(pw.size());
  }
}

awaitable<bool> ssh_session::authenticate() {
  const std::string& u = t_.user;
  const auto ulen = static_cast<unsigned>(u.size());
  std::string methods;
  for (;;) {
    char* list = libssh2_userauth_list(session_, u.c_str(), ulen);
    if (list) {
      methods = list;
      break;
    }
    if (libssh2_userauth_authenticated(session_)) co_return true;  // "none" was enough
    if (libssh2_session_last_errno(session_) != LIBSSH2_ERROR_EAGAIN) {
      fail(connect_errc::auth_failed, "cannot list the authentication methods of " + where() + ": " + last_error());
      co_return false;
    }
    if (!co_await wait_socket()) co_return false;
  }
  auto offers = [&](std::string_view m) {
    std::string_view rest = methods;
    while (!rest.empty()) {
      auto c = rest.find(',');
      if (rest.substr(0, c) == m) return true;
      if (c == std::string_view::npos) break;
      rest.remove_prefix(c + 1);
    }
    return false;
  };
  std::vector<std::string> tried;

  if (offers("publickey")) {
    const char* sock = t_.agent_socket ? t_.agent_socket->c_str() : std::getenv("SSH_AUTH_SOCK");
    if (t_.use_agent && sock && *sock) {
      // The agent speaks over a blocking local UNIX socket: connect, listing and each
      // signature block the broker thread briefly (a local round trip each).
      agent_ = libssh2_agent_init(session_);
      if (agent_ && t_.agent_socket) libssh2_agent_set_identity_path(agent_, sock);
      if (agent_ && libssh2_agent_connect(agent_) == 0 && libssh2_agent_list_identities(agent_) == 0) {
        struct libssh2_agent_publickey* id = nullptr;
        struct libssh2_agent_publickey* prev = nullptr;
        while (libssh2_agent_get_identity(agent_, &id, prev) == 0) {
          int rc = co_await retry([&] { return libssh2_agent_userauth(agent_, u.c_str(), id); });
          if (closed_) co_return false;
          if (rc == 0) co_return true;
          tried.push_back(std::string("agent key ") + (id->comment ? id->comment : "?"));
          prev = id;
        }
      }
      if (agent_) {
        libssh2_agent_disconnect(agent_);
        libssh2_agent_free(agent_);
        agent_ = nullptr;
      }
    }
    for (const auto& f : t_.identity_files) {
      if (!file_exists(f)) continue;
      const std::string pub = f + ".pub";
      const char* pubp = file_exists(pub) ? pub.c_str() : nullptr;
      int rc = co_await retry(
          [&] { return libssh2_userauth_publickey_fromfile_ex(session_, u.c_str(), ulen, pubp, f.c_str(), nullptr); });
      if (closed_) co_return false;
      if (rc == 0) co_return true;
      tried.push_back(f + (rc == LIBSSH2_ERROR_FILE ? " (unreadable, or protected by a passphrase)" : ""));
    }
  }
  if (t_.password) {
    const std::string& pw = *t_.password;
    if (offers("password")) {
      int rc = co_await retry([&] {
        return libssh2_userauth_password_ex(session_, u.c_str(), ulen, pw.c_str(), static_cast<unsigned>(pw.size()),
                                            nullptr);
      });
      if (closed_) co_return false;
      if (rc == 0) co_return true;
      tried.push_back("password");
    } else if (offers("keyboard-interactive")) {
      int rc = co_await retry(
          [&] { return libssh2_userauth_keyboard_interactive_ex(session_, u.c_str(), ulen, &kbd_callback); });
      if (closed_) co_return false;
      if (rc == 0) co_return true;
      tried.push_back("keyboard-interactive");
    }
  }
  std::string t;
  for (const auto& x : tried) t += (t.empty() ? "" : ", ") + x;
  fail(connect_errc::auth_failed, "authentication as " + where() + " failed (server accepts: " + methods +
                              "; tried: " + (t.empty() ? "nothing usable" : t) + ")");
  co_return false;
}

// --- the bridge -------------------------------------------------------------------

void ssh_session::arm_socket(bool write) {
  bool& armed = write ? sock_wr_ : sock_rd_;
  if (armed || closed_) return;
  armed = true;
  sock_.async_wait(write ? tcp::socket::wait_write : tcp::socket::wait_read,
                   [self = shared_from_this(), write](const boost::system::error_code& ec) {
                     (write ? self->sock_wr_ : self->sock_rd_) = false;
                     if (ec || self->closed_) return;
                     if (!write) self->last_rx_ = clk::now();
                     self->pump();
                   });
}

void ssh_session::arm_bridge(bool write) {
  bool& armed = write ? br_wr_ : br_rd_;
  if (armed || closed_) return;
  armed = true;
  bridge_.async_wait(write ? asio::posix::stream_descriptor::wait_write : asio::posix::stream_descriptor::wait_read,
                     [self = shared_from_this(), write](const boost::system::error_code& ec) {
                       (write ? self->br_wr_ : self->br_rd_) = false;
                       if (ec || self->closed_) return;
                       self->pump();
                     });
}

bool ssh_session::pump_once(bool& fatal) {
  bool progress = false;
  const int bfd = bridge_.native_handle();

  // bridge -> channel stdin.
  char* scratch = pump_scratch();
  const char* up = up_.data() + up_off_;
  if (up_len_ == 0 && !bridge_eof_) {
    ssize_t n = ::recv(bfd, scratch, bridge_chunk, MSG_DONTWAIT);
    if (n > 0) {
      up = scratch;
      up_len_ = static_cast<std::size_t>(n);
      progress = true;
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      bridge_eof_ = true;  // the stream closed its end: the context is going away
    } else {
      arm_bridge(false);
    }
  }
  if (up_len_ > 0) {
    ssize_t n = libssh2_channel_write(channel_, up, up_len_);
    if (n > 0) {
      up += n;
      up_len_ -= static_cast<std::size_t>(n);
      progress = true;
    } else if (n != LIBSSH2_ERROR_EAGAIN) {
      lost("SSH channel write failed: " + last_error());
      fatal = true;
      return false;
    }
    keep_unsent(up_, up_off_, up, up_len_);
  }

  // Channel stderr: logged and kept for error messages; never flow-controlled.
  for (;;) {
    char buf[8192];
    ssize_t n = libssh2_channel_read_stderr(channel_, buf, sizeof buf);
    if (n > 0) {
      stderr_.feed({buf, static_cast<std::size_t>(n)});
      progress = true;
      continue;
    }
    if (n < 0 && n != LIBSSH2_ERROR_EAGAIN) {
      lost("SSH channel read failed: " + last_error());
      fatal = true;
      return false;
    }
    break;
  }

  // Channel stdout -> bridge. Read only when the last chunk is written: a full bridge
  // stops the reads, and the SSH window then stops the remote writer.
  const char* down = down_.data() + down_off_;
  if (down_len_ == 0 && !chan_eof_) {
    ssize_t n = libssh2_channel_read(channel_, scratch + bridge_chunk, bridge_chunk);
    if (n > 0) {
      down = scratch + bridge_chunk;
      down_len_ = static_cast<std::size_t>(n);
      progress = true;
    } else if (n == 0 || n == LIBSSH2_ERROR_EAGAIN) {
      if (libssh2_channel_eof(channel_)) chan_eof_ = true;
    } else {
      lost("SSH channel read failed: " + last_error());
      fatal = true;
      return false;
    }
  }
  if (down_len_ > 0) {
    ssize_t n = ::send(bfd, down, down_len_, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      down += n;
      down_len_ -= static_cast<std::size_t>(n);
      progress = true;
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      arm_bridge(true);
    } else {
      bridge_eof_ = true;
      down_len_ = 0;
    }
    keep_unsent(down_, down_off_, down, down_len_);
  }
  return progress;
}

void ssh_session::pump() {
  pump_posted_ = false;
  if (closed_ || !channel_) return;
  if (draining_) {
    // The remote side sent EOF: wait (briefly) for the exit status and close.
    bool fatal = false;
    pump_once(fatal);
    if (fatal || closed_) return;
    int rc = libssh2_channel_wait_closed(channel_);
    if (rc != LIBSSH2_ERROR_EAGAIN) return finish_eof(rc == 0);
    arm_socket(false);
    if (libssh2_session_block_directions(session_) & LIBSSH2_SESSION_BLOCK_OUTBOUND) arm_socket(true);
    return;
  }
  // Bounded, so one busy connection cannot starve the others on the broker thread.
  for (int round = 0; round < 16; ++round) {
    bool fatal = false;
    bool progress = pump_once(fatal);
    if (fatal || closed_) return;
    if (bridge_eof_ && up_len_ == 0) return close("the stream closed");
    if (chan_eof_ && down_len_ == 0) return remote_eof();
    if (!progress) {
      arm_socket(false);  // always: inbound data may unblock either direction
      if (libssh2_session_block_directions(session_) & LIBSSH2_SESSION_BLOCK_OUTBOUND) arm_socket(true);
      return;
    }
  }
  if (!pump_posted_) {
    pump_posted_ = true;
    asio::post(broker_->io(), [self = shared_from_this()] { self->pump(); });
  }
}

/// Stderr the transport has already received (with the channel's close, say) that
/// no pump round read yet: the error message needs all of it.
void ssh_session::read_stderr_now() {
  if (!channel_) return;
  char buf[8192];
  ssize_t n;
  while ((n = libssh2_channel_read_stderr(channel_, buf, sizeof buf)) > 0) stderr_.feed({buf, static_cast<std::size_t>(n)});
}

bool ssh_session::booted() {
  std::lock_guard lk(boot_->mu);
  return boot_->done && boot_->ok;
}

void ssh_session::remote_eof() {
  draining_ = true;
  if (booted()) {
    // A running context: its callers must fail at once. End the bridge now; the
    // exit status that follows only goes to the log.
    ::shutdown(bridge_.native_handle(), SHUT_RDWR);
    linger_.expires_after(std::chrono::milliseconds(250));
  } else {
    // Still booting (a missing interpreter, a crash in stage 1): the only one
    // waiting is run_bootstrap(), which fails on the stream's end of file and whose
    // message must carry the exit status. The server sends that status after its
    // EOF, so the bridge stays open until finish_eof() has recorded it: the note is
    // in boot_state before the stream can see the end. The connect timeout bounds
    // a server that never sends it; this linger only bounds the session itself.
    linger_.expires_after(std::chrono::seconds(30));
  }
  linger_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->finish_eof(false);
  });
  pump();
}

void ssh_session::finish_eof(bool channel_closed) {
  if (closed_) return;
  read_stderr_now();
  std::string note;
  if (!channel_closed || !channel_) {
    note = "the remote command closed its output; no exit status arrived";
  } else {
    // The server sends exit-status (or exit-signal) before closing the channel.
    char* sig = nullptr;
    libssh2_channel_get_exit_signal(channel_, &sig, nullptr, nullptr, nullptr, nullptr, nullptr);
    note = sig ? std::string("the remote command was killed by SIG") + sig
               : "the remote command exited with status " + std::to_string(libssh2_channel_get_exit_status(channel_));
    if (sig) libssh2_free(session_, sig);
  }
  boot_->set_note(note);
  close(note);  // closes the bridge: the stream sees its end only now
}

void ssh_session::lost(const std::string& why) {
  boot_->finish(false, make_error_code(errc::child_died), "SSH connection to " + where() + " lost: " + why);
  close(why);
}

void ssh_session::keepalive_tick() {
  if (closed_) return;
  const auto silent = clk::now() - last_rx_;
  if (silent > t_.keepalive_interval * std::max(1, t_.keepalive_count)) {
    spdlog::warn("[{}] no answer from the SSH server for {} s: disconnecting", t_.name,
                 std::chrono::duration_cast<std::chrono::seconds>(silent).count());
    return lost("keepalive timeout");
  }
  int next = 0;
  libssh2_keepalive_send(session_, &next);  // EAGAIN is fine: the pump flushes it
  pump();
  if (closed_) return;
  keepalive_.expires_after(t_.keepalive_interval);
  keepalive_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->keepalive_tick();
  });
}

// --- teardown ------------------------------------------------------------------------

void ssh_session::free_libssh2() {
  if (agent_) {
    libssh2_agent_disconnect(agent_);
    libssh2_agent_free(agent_);
    agent_ = nullptr;
  }
  if (session_) {
    // The socket is shut down first, so nothing below can block or answer EAGAIN.
    if (channel_) libssh2_channel_free(channel_);
    channel_ = nullptr;
    libssh2_session_free(session_);
    session_ = nullptr;
  }
}

void ssh_session::close(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  spdlog::debug("[{}] ssh session closing: {}", t_.name, why);
  boost::system::error_code ig;
  keepalive_.cancel();
  linger_.cancel();
  bridge_.close(ig);  // the stream sees EOF: callers fail at once
  stderr_.close();
  if (session_ && handshaken_) libssh2_session_disconnect(session_, "mitogen: closing");  // one try, best effort
  if (sock_.is_open()) ::shutdown(sock_.native_handle(), SHUT_RDWR);
  free_libssh2();
  sock_.close(ig);
}

std::shared_ptr<ssh_session> start_ssh_session(std::shared_ptr<broker> b, ssh_target t, int bridge_fd,
                                               std::shared_ptr<boot_state> boot) {
  auto s = std::make_shared<ssh_session>(b, std::move(t), bridge_fd, std::move(boot));
  asio::co_spawn(b->io(), s->run(s), asio::detached);
  return s;
}

void close_ssh_session(const std::shared_ptr<ssh_session>& s) { s->close("context disconnected"); }

}  // namespace mitogen::detail
