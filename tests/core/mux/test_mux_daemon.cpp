// The multiplexer daemon in-process (mitogen::mux::daemon) with real clients and
// real local contexts.
#include "mitogen/mux/daemon.hpp"  // first: the header compiles on its own

#include <grp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "fake_child.hpp"
#include "mitogen/context/connection_stack.hpp"
#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/mux/protocol.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/pickle.hpp"
#include "mux_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using test::eventually;
using test::local_stack;
using test::mux_rig;
using test::pid_of;

namespace {

const wire::value* field(const wire::value& d, const char* key) {
  for (auto& [k, v] : d.as<wire::dict>().items)
    if (k.is<wire::str>() && k.as<wire::str>().utf8 == key) return &v;
  return nullptr;
}

std::int64_t int_field(const wire::value& d, const char* key) { return field(d, key)->as<std::int64_t>(); }

/// The status entry of context `id`, or nullptr.
const wire::value* entry_of(const wire::value& status, std::uint32_t id) {
  for (auto& e : field(status, "contexts")->as<wire::list>().items) {
    auto* i = field(e, "id");
    if (i && i->is<std::int64_t>() && i->as<std::int64_t>() == id) return &e;
  }
  return nullptr;
}

std::size_t context_count(const wire::value& status) { return field(status, "contexts")->as<wire::list>().items.size(); }

/// A raw connection to the daemon (no client library), for misbehaving on purpose.
struct raw_client {
  int fd = -1;
  std::uint32_t id = 0;
  explicit raw_client(const std::string& sock) {
    fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, sock.c_str());
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    auto hello = recv();
    REQUIRE(hello.handle == wire::MUX_HELLO);
    id = hello.dst_id;
  }
  ~raw_client() { ::close(fd); }
  wire::message recv() {
    wire::frame_parser p;
    wire::message m;
    char c;
    for (;;) {
      REQUIRE(::read(fd, &c, 1) == 1);  // one byte at a time: simple, and reads no further
      std::span<const std::uint8_t> in(reinterpret_cast<const std::uint8_t*>(&c), 1);
      if (p.parse(in, m) == wire::frame_parser::status::good) return m;
    }
  }
  void write(const std::string& bytes) { REQUIRE(::write(fd, bytes.data(), bytes.size()) == (ssize_t)bytes.size()); }
  /// True once the daemon hung up on us (EOF), within 10 s.
  bool dropped() {
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n == 0) return true;
      if (n < 0) return false;  // timeout
    }
  }
};

}  // namespace

TEST_CASE("mux: two clients share one context per stack, and call it directly", "[mux][daemon]") {
  mux_rig t;
  auto a = t.attach();
  auto b = t.attach();
  CHECK(a->context_id() != b->context_id());
  CHECK(a->daemon_pid() == ::getpid());
  context ca = a->connect(local_stack());
  context cb = b->connect(local_stack());
  CHECK(ca.id() == cb.id());
  CHECK(ca.get_router() == a->get_router());
  const auto pid = pid_of(ca);
  CHECK(pid_of(cb) == pid);
  CHECK(pid != ::getpid());
  // Another stack: another context.
  context other = a->connect(local_stack({"-E"}));
  CHECK(other.id() != ca.id());
  CHECK(pid_of(other) != pid);

  auto st = b->status();
  CHECK(int_field(st, "clients") == 2);
  CHECK(context_count(st) == 2);
  auto* e = entry_of(st, ca.id());
  REQUIRE(e);
  CHECK(int_field(*e, "uses") == 2);
  CHECK(int_field(*e, "clients") == 2);
  CHECK(field(*e, "stack")->as<wire::str>().utf8 == "local (/usr/bin/python3)");
  CHECK(field(*e, "state")->as<wire::str>().utf8 == "connected");

  // A client that detaches leaves the context to the others.
  a->detach();
  CHECK(pid_of(cb) == pid);
  REQUIRE(eventually([&] { return int_field(*entry_of(b->status(), cb.id()), "clients") == 1; }));
}

TEST_CASE("mux: concurrent connects of one stack wait for the same attempt", "[mux][daemon]") {
  mux_rig t;
  std::vector<std::shared_ptr<mux::client>> clients;
  for (int i = 0; i < 6; ++i) clients.push_back(t.attach());
  std::vector<std::future<std::uint32_t>> ids;
  for (auto& c : clients)
    ids.push_back(std::async(std::launch::async, [c] { return c->connect(local_stack()).id(); }));
  std::set<std::uint32_t> seen;
  for (auto& f : ids) seen.insert(f.get());
  CHECK(seen.size() == 1);
  CHECK(t.d->contexts() == 1);
  auto st = clients[0]->status();
  CHECK(int_field(*entry_of(st, *seen.begin()), "uses") == 6);
}

TEST_CASE("mux: MUX_RESET shuts a context down, the next connect makes a new one", "[mux][daemon]") {
  mux_rig t;
  auto c = t.attach();
  context first = c->connect(local_stack());
  const auto pid = pid_of(first);
  CHECK(c->reset(local_stack()) == 1);
  CHECK(c->reset(local_stack({"-s"})) == 0);  // nothing of that stack
  REQUIRE(eventually([&] { return test::process_gone(pid); }));
  context second = c->connect(local_stack());
  CHECK(second.id() != first.id());
  CHECK(pid_of(second) != pid);
  // The old Context fails at once rather than hanging.
  CHECK_THROWS_AS(first.call({.module = "os", .function = "getpid"}, 10s), channel_error);
}

TEST_CASE("mux: a context that dies is forgotten and the next connect reconnects", "[mux][daemon]") {
  mux_rig t;
  auto c = t.attach();
  context ctx = c->connect(local_stack());
  const auto pid = pid_of(ctx);
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGKILL) == 0);
  REQUIRE(eventually([&] { return t.d->contexts() == 0; }));
  CHECK_THROWS_AS(ctx.call({.module = "os", .function = "getpid"}, 10s), channel_error);
  context again = c->connect(local_stack());
  CHECK(again.id() != ctx.id());
  CHECK(pid_of(again) != pid);
}

TEST_CASE("mux: over max_contexts the least recently used idle context goes", "[mux][daemon]") {
  mux::config cfg;
  cfg.max_contexts = 2;
  mux_rig t(cfg);
  auto ids_of = [&] {
    auto c = t.attach();
    std::set<std::int64_t> ids;
    auto st = c->status();
    for (auto& e : field(st, "contexts")->as<wire::list>().items) ids.insert(int_field(e, "id"));
    return ids;
  };
  // Three clients, one stack each, one after the other; each detaches.
  auto use = [&](const wire::value& stack) {
    auto c = t.attach();
    auto ctx = c->connect(stack);
    auto pid = pid_of(ctx);
    c->detach();
    return std::make_pair(ctx.id(), pid);
  };
  auto [s1, p1] = use(local_stack({"-E"}));
  auto [s2, p2] = use(local_stack({"-s"}));
  // The daemon hears a detach on its broker thread: wait for it before going on.
  REQUIRE(eventually([&] { return t.d->clients() == 0; }));
  auto [s3, p3] = use(local_stack({"-B"}));
  CHECK(ids_of() == std::set<std::int64_t>{s2, s3});  // s1 was idle the longest
  REQUIRE(eventually([&, p = p1] { return test::process_gone(p); }));
  // Touch s2: s3 is now the least recently used.
  auto again = use(local_stack({"-s"}));
  CHECK(again.first == s2);
  REQUIRE(eventually([&] { return t.d->clients() == 0; }));
  auto [s4, p4] = use(local_stack({"-I"}));
  CHECK(ids_of() == std::set<std::int64_t>{s2, s4});

  // A context in use is never evicted: over the limit, the daemon keeps it.
  auto holder = t.attach();
  auto held = holder->connect(local_stack({"-E"}));  // evicts s2 (idle), keeps s4
  auto holder2 = t.attach();
  auto held2 = holder2->connect(local_stack({"-O"}));  // s4 idle: it goes
  auto holder3 = t.attach();
  auto held3 = holder3->connect(local_stack({"-B"}));  // everything in use: 3 contexts
  CHECK(t.d->contexts() == 3);
  CHECK(pid_of(held) != pid_of(held2));
  holder3->detach();
  // Once idle again, the extra one goes.
  REQUIRE(eventually([&] { return t.d->contexts() == 2; }));
  CHECK(pid_of(held) > 0);
  CHECK(pid_of(held2) > 0);
  (void)p2;
  (void)p3;
  (void)p4;
  (void)held3;
}

TEST_CASE("mux: a failed connection keeps its kind; a bad stack is a bad request", "[mux][daemon]") {
  mux_rig t;
  auto c = t.attach();
  wire::dict hop;
  hop.items.emplace_back(wire::str{"method"}, wire::str{"local"});
  hop.items.emplace_back(wire::str{"python_path"}, wire::str{"/nonexistent/python"});
  wire::list stack;
  stack.items.emplace_back(hop);
  try {
    c->connect(stack);
    FAIL("connected with a missing interpreter");
  } catch (const stream_error& e) {
    CHECK(e.code() == connect_errc::spawn_failed);
    CHECK(std::string(e.what()).find("/nonexistent/python") != std::string::npos);
  }
  CHECK(t.d->contexts() == 0);  // a failure is not cached: the next connect tries again
  wire::dict bad;
  bad.items.emplace_back(wire::str{"method"}, wire::str{"rsh"});
  wire::list bad_stack;
  bad_stack.items.emplace_back(bad);
  CHECK_THROWS_AS(c->connect(bad_stack), stack_error);
  CHECK_THROWS_WITH(c->connect(wire::str{"nonsense"}), Catch::Matchers::Contains("expected a list of hop dicts"));
  // The client is still fine.
  CHECK(pid_of(c->connect(local_stack())) > 0);
}

TEST_CASE("mux: a client sending garbage is dropped, the others keep working", "[mux][daemon]") {
  mux_rig t;
  auto good = t.attach();
  context ctx = good->connect(local_stack());
  const auto pid = pid_of(ctx);

  SECTION("a bad frame") {
    raw_client bad(t.sock);
    bad.write(std::string(40, 'G'));
    CHECK(bad.dropped());
  }
  SECTION("a frame claiming another source") {
    raw_client bad(t.sock);
    wire::message m;
    m.dst_id = 0;
    m.src_id = m.auth_id = good->context_id();  // pretending to be the good client
    m.handle = wire::MUX_STOP;
    m.reply_to = 1000;
    m.data = wire::encode(wire::value(wire::none{}));
    bad.write(wire::encode_frame(m));
    CHECK(bad.dropped());
  }
  SECTION("a frame too large") {
    raw_client bad(t.sock);
    wire::message m;
    m.dst_id = 0;
    m.src_id = m.auth_id = bad.id;
    m.handle = wire::MUX_STATUS;
    std::string frame = wire::encode_frame(m);
    frame[22] = frame[23] = frame[24] = frame[25] = '\xff';  // a 4 GiB payload announced
    bad.write(frame);
    CHECK(bad.dropped());
  }
  SECTION("an undecodable request is answered, not fatal") {
    raw_client odd(t.sock);
    wire::message m;
    m.dst_id = 0;
    m.src_id = m.auth_id = odd.id;
    m.handle = wire::MUX_CONNECT;
    m.reply_to = 1000;
    m.data = "\x80\x02garbage";
    odd.write(wire::encode_frame(m));
    auto r = odd.recv();
    CHECK(r.handle == 1000);
    CHECK_THROWS_AS(mux::decode_reply(r), stack_error);
  }
  CHECK(pid_of(ctx) == pid);
  CHECK(t.d->contexts() == 1);
  CHECK(pid_of(good->connect(local_stack())) == pid);
  CHECK_FALSE(t.d->wait_stop_requested(0ms));
}

TEST_CASE("mux: contexts may not ask the daemon for anything", "[mux][daemon]") {
  mux_rig t;
  // A child of the daemon's router (as every context is), speaking by hand.
  test::fake_child child;
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  child.fd = sv[1];
  auto r = t.d->get_router();
  auto id = r->allocate_id();
  auto s = stream::create(r->get_broker(), sv[0], sv[0], {.name = "target"});
  r->add_route(id, "target", s);
  s->start();
  for (auto handle : {wire::MUX_CONNECT, wire::MUX_STATUS, wire::MUX_STOP}) {
    wire::message m;
    m.dst_id = 0;
    m.src_id = m.auth_id = id;
    m.handle = handle;
    m.reply_to = 1000;
    m.data = wire::encode(local_stack());
    child.send(m);
    auto reply = child.recv();
    CHECK(reply.is_dead());
    CHECK(reply.data.find("refused") != std::string::npos);
  }
  CHECK_FALSE(t.d->wait_stop_requested(0ms));
  CHECK(t.d->contexts() == 0);
}

TEST_CASE("mux: only our own uid may attach", "[mux][daemon][root]") {
  if (::geteuid() != 0) {
    WARN("needs root to switch to another uid: skipped");
    return;
  }
  mux_rig t;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, t.sock.c_str());
  // In a child as nobody, with only async-signal-safe calls: 0 = the daemon hung up
  // at once, 1 = it greeted us, 2 = connect() refused (permissions), 3 = setup failed.
  auto try_as_nobody = [&] {
    pid_t pid = ::fork();
    if (pid == 0) {
      if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(3);
      int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ::_exit(2);
      char c;
      ssize_t n = ::read(fd, &c, 1);
      ::_exit(n == 0 ? 0 : 1);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  // The private directory alone keeps others out.
  CHECK(try_as_nobody() == 2);
  // Even if the directory and socket were opened up, SO_PEERCRED does.
  ::chmod(t.dir.path.c_str(), 0711);
  ::chmod(t.sock.c_str(), 0777);
  CHECK(try_as_nobody() == 0);
  CHECK(t.d->clients() == 0);
  auto c = t.attach();  // we still may
  CHECK(pid_of(c->connect(local_stack())) > 0);
}

TEST_CASE("mux: the idle timeout ends the daemon once no client is attached", "[mux][daemon]") {
  SECTION("idle_timeout 1 s") {
    mux::config cfg;
    cfg.idle_timeout = 1s;
    mux_rig t(cfg);
    auto c = t.attach();
    // Attached for longer than the timeout: it stays.
    CHECK_FALSE(t.d->wait_stop_requested(2500ms));
    c->detach();
    CHECK(t.d->wait_stop_requested(20s));
  }
  SECTION("idle_timeout 0: with the last client") {
    mux::config cfg;
    cfg.idle_timeout = 0s;
    mux_rig t(cfg);
    auto a = t.attach();
    auto b = t.attach();
    a->detach();
    REQUIRE(eventually([&] { return t.d->clients() == 1; }));
    CHECK_FALSE(t.d->wait_stop_requested(0ms));
    b->detach();
    CHECK(t.d->wait_stop_requested(20s));
  }
  SECTION("nobody ever attaches") {
    mux::config cfg;
    cfg.idle_timeout = 0s;
    mux_rig t(cfg, 200ms);
    CHECK(t.d->wait_stop_requested(20s));
  }
}

TEST_CASE("mux: a client whose daemon goes away is released at once", "[mux][daemon]") {
  mux_rig t;
  auto c = t.attach();
  context ctx = c->connect(local_stack());
  auto rx = ctx.call_async({.module = "time", .function = "sleep", .args = {{std::int64_t{60}}}});
  t.d->shutdown();
  auto m = rx->get(10s);
  CHECK(m.is_dead());
  CHECK_THROWS_AS(c->status(), channel_error);
  CHECK_THROWS_AS(c->connect(local_stack()), channel_error);
}

TEST_CASE("mux: a stale socket is replaced, anything else is refused", "[mux][daemon]") {
  test::temp_dir dir;
  const std::string sock = dir.path + "/mux.sock";
  {
    // A dead daemon's socket: bound, then its process gone (nothing listens).
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, sock.c_str());
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    ::close(fd);
  }
  std::shared_ptr<mux::instance_lock> lock = mux::instance_lock::try_acquire(mux::lock_path(sock));
  REQUIRE(lock);
  auto d = mux::daemon::start({.socket_path = sock, .cfg = {}, .module_dir = "", .lock = std::move(lock)});
  auto c = mux::client::attach(sock);
  CHECK(c->daemon_pid() == ::getpid());
  c->detach();
  d->shutdown();
  // Its own socket file is gone with it.
  struct stat st {};
  CHECK(::lstat(sock.c_str(), &st) != 0);

  const std::string file = dir.path + "/not-a-socket";
  { std::ofstream(file) << "precious"; }
  auto lock2 = mux::instance_lock::try_acquire(mux::lock_path(file));
  CHECK_THROWS_WITH(mux::daemon::start({.socket_path = file, .cfg = {}, .module_dir = ""}),
                    Catch::Matchers::Contains("exists and is not a socket"));
  std::ifstream in(file);
  std::string kept;
  in >> kept;
  CHECK(kept == "precious");
}

TEST_CASE("mux: the instance lock admits one holder", "[mux][daemon]") {
  test::temp_dir dir;
  const auto path = mux::lock_path(dir.path + "/mux.sock");
  auto first = mux::instance_lock::try_acquire(path);
  REQUIRE(first);
  CHECK_FALSE(mux::instance_lock::try_acquire(path));
  first.reset();
  CHECK(mux::instance_lock::try_acquire(path));
}

TEST_CASE("mux: private directories", "[mux][daemon]") {
  test::temp_dir dir;
  CHECK(mux::check_private_dir(dir.path) == "");
  const std::string sub = dir.path + "/new";
  CHECK(mux::check_private_dir(sub) == "");
  struct stat st {};
  REQUIRE(::stat(sub.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  ::chmod(sub.c_str(), 0755);
  CHECK(mux::check_private_dir(sub).find("open to other users (mode 755") != std::string::npos);
  const std::string link = dir.path + "/link";
  REQUIRE(::symlink(dir.path.c_str(), link.c_str()) == 0);
  CHECK(mux::check_private_dir(link).find("is not a directory") != std::string::npos);
  if (::geteuid() == 0) {
    const std::string theirs = dir.path + "/theirs";
    REQUIRE(::mkdir(theirs.c_str(), 0700) == 0);
    REQUIRE(::chown(theirs.c_str(), 65534, 65534) == 0);
    CHECK(mux::check_private_dir(theirs).find("belongs to uid 65534") != std::string::npos);
  }
}

TEST_CASE("mux: a client that detaches while its context is connecting does not hold it", "[mux][daemon]") {
  mux_rig t;
  auto quitter = t.attach();
  auto rx = quitter->request(wire::MUX_CONNECT, wire::encode(local_stack()));
  quitter->detach();  // most likely before the bootstrap ends
  auto other = t.attach();
  context ctx = other->connect(local_stack());  // waits for the same attempt
  other->detach();
  auto watcher = t.attach();
  // Nobody uses it any more: it is idle (and so may be evicted).
  REQUIRE(eventually([&] {
    auto st = watcher->status();
    auto* e = entry_of(st, ctx.id());
    return e && int_field(*e, "clients") == 0;
  }));
}

TEST_CASE("mux: a daemon whose module changed retires: new clients go to the next one", "[mux][daemon]") {
  test::temp_dir mods;
  const std::string target = mods.path + "/mitogen_native_target.py";
  { std::ofstream(target) << "def version():\n    return 1\n"; }
  mux_rig t({}, std::chrono::seconds(60), mods.path);
  auto old_client = t.attach();
  context ctx = old_client->connect(local_stack());
  // The build (or an upgrade) replaces the module.
  ::unlink(target.c_str());
  { std::ofstream(target) << "def version():\n    return 2\n"; }
  // The next client is turned away, and the socket and lock are free for a new daemon.
  CHECK_THROWS_AS(t.attach(), std::system_error);
  CHECK(t.d->retired());
  struct stat st {};
  CHECK(::lstat(t.sock.c_str(), &st) != 0);
  CHECK(mux::instance_lock::try_acquire(mux::lock_path(t.sock)));
  // The attached client is still served; once it leaves, the old daemon ends.
  CHECK(pid_of(ctx) > 0);
  CHECK_FALSE(t.d->wait_stop_requested(0ms));
  old_client->detach();
  CHECK(t.d->wait_stop_requested(20s));
}
