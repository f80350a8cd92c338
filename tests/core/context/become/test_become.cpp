#include "mitogen/context/errors.hpp"
#include "mitogen/context/become.hpp"  // first: the header compiles on its own

#include <signal.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <sstream>
#include <thread>

#include "become_fixture.hpp"
#include "mitogen/mitogen.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

namespace {

using rig = test::router_rig;

std::int64_t remote_uid(const context& c) { return c.call({.module = "os", .function = "getuid"}).as<std::int64_t>(); }
pid_t remote_pid(const context& c) {
  return static_cast<pid_t>(c.call({.module = "os", .function = "getpid"}).as<std::int64_t>());
}

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

std::string read_proc(pid_t pid, const char* what) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/" + what);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

pid_t parent_of(pid_t pid) {
  std::string stat = read_proc(pid, "stat");
  auto close = stat.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream in(stat.substr(close + 2));
  char state;
  pid_t ppid = 0;
  in >> state >> ppid;
  return ppid;
}

bool alive(pid_t pid) { return ::kill(pid, 0) == 0 || errno != ESRCH; }

/// Captures the master's log lines, at debug level while it lives.
struct log_capture {
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(4096);
  spdlog::level::level_enum old = spdlog::default_logger()->level();
  log_capture() {
    spdlog::default_logger()->sinks().push_back(sink);
    spdlog::default_logger()->set_level(spdlog::level::debug);
  }
  ~log_capture() {
    spdlog::default_logger()->set_level(old);
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink), sinks.end());
  }
  std::string all() {
    std::string out;
    for (auto& l : sink->last_formatted()) out += l;
    return out;
  }
};

sudo_options sudo_as_test(const test::become_fixture& f) {
  sudo_options o;
  o.sudo_path = f.at("sudo_as_test");
  o.connect_timeout = 30s;
  return o;
}

}  // namespace

TEST_CASE("sudo from root needs no password and runs as the target user", "[become]") {
  NEED_BECOME(f);
  rig t;
  sudo_options o;
  o.username = f->at("test_user");
  context c = sudo(*t.r, o);
  CHECK(c.name() == "sudo.mitogen-test");
  CHECK(remote_uid(c) == f->uid("test_uid"));
  CHECK(c.shutdown(true));
}

TEST_CASE("sudo: the password prompt is answered; calls run as the target user", "[become]") {
  NEED_BECOME(f);
  rig t;
  log_capture logs;
  auto o = sudo_as_test(*f);
  o.password = f->at("test_password");
  o.remote_name = "become-test";
  SECTION("to root") {
    context c = sudo(*t.r, o);
    CHECK(c.name() == "sudo.root");
    CHECK(remote_uid(c) == 0);
    // The whole chain from the agent up to us: sudo, setpriv, the agent. The password
    // is on no command line, and the agent names itself.
    pid_t pid = remote_pid(c);
    CHECK(read_proc(pid, "cmdline").find("mitogen:become-test") != std::string::npos);
    int depth = 0;
    for (pid_t p = pid; p > 1 && p != ::getpid() && depth < 10; p = parent_of(p), ++depth)
      CHECK(read_proc(p, "cmdline").find(f->at("test_password")) == std::string::npos);
    CHECK(depth >= 2);  // the agent is below sudo, not our child
    // The terminal stays ours after the bootstrap: closing it would hang it up and
    // sudo would pass the SIGHUP to the agent.
    std::this_thread::sleep_for(1500ms);
    CHECK(remote_uid(c) == 0);
    CHECK(c.shutdown(true));
    std::string log = logs.all();
    CHECK(log.find("password prompt") != std::string::npos);  // debug lines were captured
    CHECK(log.find(f->at("test_password")) == std::string::npos);
  }
  SECTION("to another unprivileged user") {
    o.username = f->at("nosudo_user");
    context c = sudo(*t.r, o);
    CHECK(c.name() == "sudo.mitogen-nosudo");
    CHECK(remote_uid(c) == f->uid("nosudo_uid"));
    CHECK(c.shutdown(true));
  }
}

TEST_CASE("sudo: a wrong password fails with become_password_wrong, promptly", "[become]") {
  NEED_BECOME(f);
  rig t;
  log_capture logs;
  auto o = sudo_as_test(*f);
  o.password = "not-the-password-1234";
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { sudo(*t.r, o); });
  auto took = clk::now() - t0;
  CHECK(e.code() == connect_errc::become_password_wrong);
  CHECK(std::string(e.what()).find("sudo password is incorrect") != std::string::npos);
  CHECK(std::string(e.what()).find("not-the-password-1234") == std::string::npos);
  CHECK(logs.all().find("not-the-password-1234") == std::string::npos);
  CHECK(took < 20s);  // PAM's failure delay is ~2 s; never the 30 s connect timeout
}

TEST_CASE("sudo: a prompt without a password fails with become_password_required", "[become]") {
  NEED_BECOME(f);
  rig t;
  auto o = sudo_as_test(*f);
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { sudo(*t.r, o); });
  CHECK(e.code() == connect_errc::become_password_required);
  CHECK(std::string(e.what()).find("password is required") != std::string::npos);
  CHECK(clk::now() - t0 < 20s);
}

TEST_CASE("sudo: a user without a sudoers rule fails with become_not_allowed", "[become]") {
  NEED_BECOME(f);
  rig t;
  sudo_options o;
  o.sudo_path = f->at("sudo_as_nosudo");
  o.password = f->at("nosudo_password");
  o.connect_timeout = 30s;
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { sudo(*t.r, o); });
  CHECK(e.code() == connect_errc::become_not_allowed);
  CHECK(std::string(e.what()).find("may not become root") != std::string::npos);
  CHECK(std::string(e.what()).find(f->at("nosudo_password")) == std::string::npos);
  CHECK(clk::now() - t0 < 20s);
}

TEST_CASE("sudo: a sudo that never prompts nor starts fails with connect_timeout in time", "[become]") {
  NEED_BECOME(f);
  rig t;
  sudo_options o;
  o.sudo_path = f->at("sudo_hang");
  o.password = "whatever";
  o.connect_timeout = 2s;
  auto t0 = clk::now();
  auto e = expect_stream_error([&] { sudo(*t.r, o); });
  auto took = clk::now() - t0;
  CHECK(e.code() == connect_errc::connect_timeout);
  CHECK(std::string(e.what()).find("no recognised password prompt") != std::string::npos);
  CHECK(took >= 1900ms);
  CHECK(took < 10s);
}

TEST_CASE("sudo: prompts in other languages; custom prompt patterns", "[become]") {
  NEED_BECOME(f);
  rig t;
  sudo_options o;
  o.password = f->at("test_password");
  o.connect_timeout = 20s;
  SECTION("German is among the defaults") {
    o.sudo_path = f->at("sudo_german");
    context c = sudo(*t.r, o);
    CHECK(remote_uid(c) == 0);
  }
  SECTION("an unknown prompt is not answered...") {
    o.sudo_path = f->at("sudo_custom");
    o.connect_timeout = 2s;
    auto e = expect_stream_error([&] { sudo(*t.r, o); });
    CHECK(e.code() == connect_errc::connect_timeout);
    CHECK(std::string(e.what()).find("Geheimwort eingeben") != std::string::npos);  // the terminal's text
  }
  SECTION("...unless password_prompts names it") {
    o.sudo_path = f->at("sudo_custom");
    o.password_prompts = {"GEHEIMWORT"};  // case-insensitive
    context c = sudo(*t.r, o);
    CHECK(remote_uid(c) == 0);
  }
}

TEST_CASE("su: answers the prompt su writes to stderr, on stdin", "[become]") {
  NEED_BECOME(f);
  rig t;
  su_options o;
  o.su_path = f->at("su_as_nosudo");
  o.username = f->at("test_user");
  o.connect_timeout = 30s;
  SECTION("right password") {
    o.password = f->at("test_password");
    context c = su(*t.r, o);
    CHECK(c.name() == "su.mitogen-test");
    CHECK(remote_uid(c) == f->uid("test_uid"));
    std::this_thread::sleep_for(1500ms);
    CHECK(remote_uid(c) == f->uid("test_uid"));
    CHECK(c.shutdown(true));
  }
  SECTION("wrong password") {
    o.password = "not-the-password-1234";
    auto e = expect_stream_error([&] { su(*t.r, o); });
    CHECK(e.code() == connect_errc::become_password_wrong);
    CHECK(std::string(e.what()).find("su password is incorrect") != std::string::npos);
    CHECK(std::string(e.what()).find("not-the-password-1234") == std::string::npos);
  }
  SECTION("no password") {
    auto e = expect_stream_error([&] { su(*t.r, o); });
    CHECK(e.code() == connect_errc::become_password_required);
  }
}

TEST_CASE("su from root needs no password", "[become]") {
  NEED_BECOME(f);
  rig t;
  su_options o;
  o.username = f->at("test_user");
  context c = su(*t.r, o);
  CHECK(remote_uid(c) == f->uid("test_uid"));
}

TEST_CASE("doas: prompt on the terminal, wrong password, no rule", "[become]") {
  NEED_BECOME(f);
  if (!f->has("doas_as_test")) MITOGEN_SKIP("doas is not installed (apt-get install opendoas)");
  rig t;
  doas_options o;
  o.doas_path = f->at("doas_as_test");
  o.connect_timeout = 30s;
  SECTION("right password") {
    o.password = f->at("test_password");
    context c = doas(*t.r, o);
    CHECK(c.name() == "doas.root");
    CHECK(remote_uid(c) == 0);
    std::this_thread::sleep_for(1500ms);
    CHECK(remote_uid(c) == 0);
  }
  SECTION("to another user") {
    o.password = f->at("test_password");
    o.username = f->at("nosudo_user");
    context c = doas(*t.r, o);
    CHECK(remote_uid(c) == f->uid("nosudo_uid"));
  }
  SECTION("wrong password") {
    o.password = "not-the-password-1234";
    auto e = expect_stream_error([&] { doas(*t.r, o); });
    CHECK(e.code() == connect_errc::become_password_wrong);
    CHECK(std::string(e.what()).find("doas password is incorrect") != std::string::npos);
  }
  SECTION("no password") {
    auto e = expect_stream_error([&] { doas(*t.r, o); });
    CHECK(e.code() == connect_errc::become_password_required);
  }
  SECTION("no doas.conf rule") {
    o.doas_path = f->at("doas_as_nosudo");
    o.password = f->at("nosudo_password");
    auto e = expect_stream_error([&] { doas(*t.r, o); });
    CHECK(e.code() == connect_errc::become_not_allowed);
  }
}

TEST_CASE("become: the child is gone after shutdown and after a failure", "[become]") {
  NEED_BECOME(f);
  rig t;
  auto o = sudo_as_test(*f);
  o.password = f->at("test_password");
  context c = sudo(*t.r, o);
  pid_t agent = remote_pid(c);
  CHECK(c.shutdown(true));
  auto deadline = clk::now() + 10s;
  while (alive(agent) && clk::now() < deadline) std::this_thread::sleep_for(20ms);
  CHECK_FALSE(alive(agent));
}

TEST_CASE("sudo_args are parsed as upstream does", "[become]") {
  const std::vector<std::string> py = {"python3"};
  sudo_options o;
  o.sudo_args = {"-H", "-S", "-n", "-u", "bob"};
  CHECK(sudo_command(o, py) == std::vector<std::string>{"sudo", "-u", "bob", "-H", "--", "python3"});
  o.sudo_args = {"-HE", "--user=carol", "-i"};
  CHECK(sudo_command(o, py) == std::vector<std::string>{"sudo", "-u", "carol", "-E", "-H", "-i", "--", "python3"});
  o.username = "dave";  // an explicit username wins over -u
  CHECK(sudo_command(o, py)[2] == "dave");
  o.sudo_args = {"-X"};
  auto e = expect_stream_error([&] { sudo_command(o, py); });
  CHECK(std::string(e.what()).find("unsupported option '-X'") != std::string::npos);
  o.sudo_args = {"-u"};
  CHECK_THROWS_AS(sudo_command(o, py), stream_error);
}

TEST_CASE("become: a password with a line break is refused before anything starts", "[become]") {
  rig t;
  sudo_options o;
  o.sudo_path = "/nonexistent/sudo";  // never started
  o.password = "first\nsecond";
  CHECK_THROWS_WITH(sudo(*t.r, o), Catch::Contains("must not contain a line break"));
}
