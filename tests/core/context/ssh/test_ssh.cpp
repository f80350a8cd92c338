#include "mitogen/context/errors.hpp"
#include "mitogen/context/ssh.hpp"  // first: the header compiles on its own

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "mitogen/mitogen.hpp"
#include "skip.hpp"
#include "sshd.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

namespace {

using rig = test::router_rig;

call_spec getpid_call() { return {.module = "os", .function = "getpid"}; }
call_spec getuser_call() { return {.module = "getpass", .function = "getuser"}; }

std::string remote_user(const context& c) { return c.call(getuser_call()).as<wire::str>().utf8; }

/// Runs `fn`, expecting stream_error; returns it.
template <class F>
stream_error expect_stream_error(F&& fn) {
  try {
    fn();
  } catch (const stream_error& e) {
    return e;
  }
  FAIL("no stream_error thrown");
  throw;  // unreachable
}

std::string cmdline(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/cmdline");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string temp_path(const std::string& tag) {
  static std::atomic<int> n{0};
  return (std::filesystem::temp_directory_path() /
          ("mitogen-ssh-test-" + std::to_string(::getpid()) + "-" + tag + std::to_string(n++)))
      .string();
}

}  // namespace

TEST_CASE("key login: calls run on the server as the remote user", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.remote_name = "ssh-test-name";
  context c = ssh(*t.r, o);
  CHECK(c.name() == "ssh.127.0.0.1:" + std::to_string(srv->port()));
  auto pid = static_cast<pid_t>(c.call(getpid_call()).as<std::int64_t>());
  CHECK(pid != ::getpid());
  CHECK(remote_user(c) == "mitogen-test");
  // The server is this machine: the agent's command line names the context.
  CHECK(cmdline(pid).find("mitogen:ssh-test-name") != std::string::npos);
  auto v = c.call({.module = "operator", .function = "add", .args = {{std::int64_t{2}, std::int64_t{40}}}});
  CHECK(v.as<std::int64_t>() == 42);
  CHECK(c.shutdown(true));
}

TEST_CASE("an explicit python_path is used as is", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.python_path = {"/usr/bin/env", "python3"};
  context c = ssh(*t.r, o);
  CHECK(remote_user(c) == "mitogen-test");
}

TEST_CASE("password login, no key and no agent", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.identity_files = {"/nonexistent/key"};
  o.password = srv->at("password");
  context c = ssh(*t.r, o);
  CHECK(remote_user(c) == "mitogen-test");
}

TEST_CASE("a wrong password is refused at once with auth_failed", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.identity_files = {"/nonexistent/key"};
  o.password = "not-the-password";
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  CHECK(e.code() == connect_errc::auth_failed);
  CHECK(clk::now() - t0 < 15s);  // refused, not the 20 s connect timeout
  CHECK_THAT(e.what(), Catch::Contains("mitogen-test@127.0.0.1") && Catch::Contains("password"));
}

TEST_CASE("no usable key and no password fails with auth_failed", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.identity_files = {"/nonexistent/key"};
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  CHECK(e.code() == connect_errc::auth_failed);
}

TEST_CASE("a changed host key is refused, showing the offered key's SHA256 fingerprint", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.known_hosts_file = srv->at("wrong_known_hosts");
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  CHECK(e.code() == connect_errc::host_key_mismatch);
  CHECK_THAT(e.what(), Catch::Contains(srv->at("host_fingerprint")));
  CHECK_THAT(e.what(), Catch::Contains("[127.0.0.1]:" + std::to_string(srv->port())));
  // 'accept' never overrides a mismatch.
  o.check_host_keys = host_key_policy::accept;
  CHECK(expect_stream_error([&] { ssh(*t.r, o); }).code() == connect_errc::host_key_mismatch);
  // 'ignore' skips the check.
  o.check_host_keys = host_key_policy::ignore;
  CHECK(remote_user(ssh(*t.r, o)) == "mitogen-test");
}

TEST_CASE("an unknown host is refused under enforce, and recorded under accept", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.known_hosts_file = temp_path("kh");
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  CHECK(e.code() == connect_errc::host_key_unknown);
  CHECK_THAT(e.what(), Catch::Contains(srv->at("host_fingerprint")));
  o.check_host_keys = host_key_policy::accept;
  CHECK(remote_user(ssh(*t.r, o)) == "mitogen-test");
  std::ifstream f(*o.known_hosts_file);
  std::string line;
  std::getline(f, line);
  CHECK(line.rfind("[127.0.0.1]:" + std::to_string(srv->port()) + " ssh-ed25519 ", 0) == 0);
  // Now known: enforce accepts it, and OpenSSH agrees with what we wrote.
  o.check_host_keys = host_key_policy::enforce;
  CHECK(remote_user(ssh(*t.r, o)) == "mitogen-test");
  o.transport = ssh_transport::openssh;
  CHECK(remote_user(ssh(*t.r, o)) == "mitogen-test");
  std::filesystem::remove(*o.known_hosts_file);
}

TEST_CASE("hashed known_hosts entries are understood", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  auto kh = temp_path("hashed");
  std::filesystem::copy_file(srv->at("known_hosts"), kh);
  REQUIRE(std::system(("ssh-keygen -q -H -f " + kh + " >/dev/null 2>&1").c_str()) == 0);
  std::ifstream f(kh);
  std::string line;
  std::getline(f, line);
  REQUIRE(line.rfind("|1|", 0) == 0);
  o.known_hosts_file = kh;
  CHECK(remote_user(ssh(*t.r, o)) == "mitogen-test");
  std::filesystem::remove(kh);
  std::filesystem::remove(kh + ".old");
}

TEST_CASE("a closed port fails at once with host_unreachable", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  // A port nobody listens on: bind, note it, close.
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  auto o = srv->key_login();
  o.port = ntohs(a.sin_port);
  o.connect_timeout = 30s;
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  CHECK(e.code() == connect_errc::host_unreachable);
  CHECK(clk::now() - t0 < 15s);  // at once: long before the connect timeout
  CHECK_THAT(e.what(), Catch::Contains("Connection refused"));
}

TEST_CASE("a server that never speaks fails within connect_timeout, naming the phase", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  // Listening but never accepting: TCP connects, the SSH banner never comes.
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(s, 16) == 0);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  auto o = srv->key_login();
  o.port = ntohs(a.sin_port);
  o.connect_timeout = 700ms;
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  auto took = clk::now() - t0;
  CHECK(e.code() == connect_errc::connect_timeout);
  CHECK(took >= 650ms);
  CHECK(took < 15s);  // the timeout, not a hang
  CHECK_THAT(e.what(), Catch::Contains("SSH handshake"));
  ::close(s);
}

TEST_CASE("killing the sshd serving a connection fails its pending calls at once", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto before = srv->session_processes();
  context c = ssh(*t.r, srv->key_login());
  REQUIRE(remote_user(c) == "mitogen-test");
  std::vector<pid_t> mine;
  for (pid_t p : srv->session_processes())
    if (std::find(before.begin(), before.end(), p) == before.end()) mine.push_back(p);
  REQUIRE(!mine.empty());
  // Pending (sent or not yet: either way it must fail); it never ends by itself.
  auto rx = c.call_async({.module = "time", .function = "sleep", .args = {{std::int64_t{300}}}});
  for (pid_t p : mine) ::kill(p, SIGKILL);
  // channel_error, not timeout_error: released by the disconnect, not by a clock.
  CHECK_THROWS_AS(c.result(rx->get(60s)), channel_error);
  CHECK_THROWS_AS(c.call(getpid_call(), 60s), channel_error);
}

TEST_CASE("a server that stops answering is declared dead after keepalive_interval * count", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto before = srv->session_processes();
  auto o = srv->key_login();
  o.keepalive_interval = 1s;
  o.keepalive_count = 2;
  context c = ssh(*t.r, o);
  REQUIRE(remote_user(c) == "mitogen-test");
  std::vector<pid_t> mine;
  for (pid_t p : srv->session_processes())
    if (std::find(before.begin(), before.end(), p) == before.end()) mine.push_back(p);
  REQUIRE(!mine.empty());
  auto rx = c.call_async({.module = "time", .function = "sleep", .args = {{std::int64_t{60}}}});
  for (pid_t p : mine) ::kill(p, SIGSTOP);  // the TCP connection stays up, silent
  auto t0 = clk::now();
  CHECK_THROWS_AS(c.result(rx->get(50s)), channel_error);
  auto took = clk::now() - t0;
  CHECK(took >= 1500ms);
  CHECK(took < 30s);  // the keepalive, not the 60 s call
  for (pid_t p : mine) ::kill(p, SIGKILL);
}

TEST_CASE("20 ssh contexts connect at once, handshakes interleaved on the broker", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  constexpr int n = 20;
  std::vector<std::thread> ts;
  std::vector<std::string> users(n);
  std::vector<std::int64_t> pids(n);
  std::atomic<int> failures{0};
  auto t0 = clk::now();
  for (int i = 0; i < n; ++i)
    ts.emplace_back([&, i] {
      try {
        context c = ssh(*t.r, srv->key_login());
        users[i] = remote_user(c);
        pids[i] = c.call(getpid_call()).as<std::int64_t>();
      } catch (const std::exception& e) {
        UNSCOPED_INFO(e.what());
        ++failures;
      }
    });
  for (auto& th : ts) th.join();
  auto took = clk::now() - t0;
  CHECK(failures == 0);
  for (auto& u : users) CHECK(u == "mitogen-test");
  std::sort(pids.begin(), pids.end());
  CHECK(std::unique(pids.begin(), pids.end()) == pids.end());
  WARN("20 concurrent ssh contexts: " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
}

TEST_CASE("big messages cross the bridge both ways, several at once", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  context c = ssh(*t.r, srv->key_login());
  std::string big(8 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 13);
  std::vector<std::shared_ptr<receiver>> rxs;
  for (int i = 0; i < 4; ++i)
    rxs.push_back(c.call_async({.module = "copy", .function = "copy", .args = {{wire::bytes{big}}}}));
  for (auto& rx : rxs) {
    auto v = c.result(rx->get(60s));
    REQUIRE(v.is<wire::bytes>());
    CHECK(v.as<wire::bytes>().data == big);
  }
  // Small calls still flow afterwards.
  for (int i = 0; i < 100; ++i) c.call(getpid_call());
}

TEST_CASE("~/.ssh/config style aliases supply HostName, Port, User and IdentityFile", "[ssh]") {
  NEED_SSHD(srv);
  rig t;
  auto cfg = temp_path("config");
  {
    std::ofstream f(cfg);
    f << "# test config\n"
      << "Host other-host\n  User nobody\n"
      << "Host mt-*  !mt-never\n"
      << "  HostName 127.0.0.1\n"
      << "  Port " << srv->port() << "\n"
      << "  User " << srv->at("user") << "\n"
      << "  IdentityFile " << srv->at("identity_file") << "\n"
      << "Host *\n  User root\n  Port 1\n";
  }
  ssh_options o;
  o.hostname = "mt-alias";
  o.ssh_config_file = cfg;
  o.use_agent = false;
  o.known_hosts_file = srv->at("known_hosts");
  context c = ssh(*t.r, o);
  CHECK(c.name() == "ssh.mt-alias:" + std::to_string(srv->port()));
  CHECK(remote_user(c) == "mitogen-test");
  std::filesystem::remove(cfg);
}

TEST_CASE("a missing remote interpreter fails with its stderr and exit status", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.python_path = {"/nonexistent/python3"};
  auto e = expect_stream_error([&] { ssh(*t.r, o); });
  CHECK(e.code() == errc::child_died);
  // What the user needs: the remote shell's own words naming the missing program,
  // and its exit status. The server sends the status after its end of file; the
  // session holds the stream open until it has it (docs/ssh.md, "Failures").
  CHECK_THAT(e.what(), Catch::Contains("/nonexistent/python3") && Catch::Contains("No such file or directory"));
  CHECK_THAT(e.what(), Catch::Contains("the remote command exited with status 127"));
}

TEST_CASE("the exit status of a failed start is in the error every time", "[ssh][fault]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  // The remote command prints, closes its output and exits at once: the server's
  // EOF and its exit-status message arrive back to back, the race this guards.
  o.python_path = {"/bin/sh", "-c", "echo gone >&2; exit 3", "--"};
  for (int i = 0; i < 10; ++i) {
    auto e = expect_stream_error([&] { ssh(*t.r, o); });
    CHECK(e.code() == errc::child_died);
    CHECK_THAT(e.what(), Catch::Contains("the remote command exited with status 3") && Catch::Contains("gone"));
  }
}

TEST_CASE("transport openssh: the system ssh binary carries the context", "[ssh][openssh]") {
  NEED_SSHD(srv);
  rig t;
  auto o = srv->key_login();
  o.transport = ssh_transport::openssh;
  context c = ssh(*t.r, o);
  CHECK(remote_user(c) == "mitogen-test");
  auto pid = static_cast<pid_t>(c.call(getpid_call()).as<std::int64_t>());
  CHECK(pid != ::getpid());
  CHECK(c.shutdown(true));

  // Its failures map onto the same codes.
  auto bad = srv->key_login();
  bad.transport = ssh_transport::openssh;
  bad.identity_files = {"/nonexistent/key"};
  CHECK(expect_stream_error([&] { ssh(*t.r, bad); }).code() == connect_errc::auth_failed);
  bad = srv->key_login();
  bad.transport = ssh_transport::openssh;
  bad.known_hosts_file = srv->at("wrong_known_hosts");
  CHECK(expect_stream_error([&] { ssh(*t.r, bad); }).code() == connect_errc::host_key_mismatch);
}
