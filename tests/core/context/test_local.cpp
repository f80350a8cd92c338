#include "mitogen/context/errors.hpp"
#include "mitogen/context/local.hpp"  // first: the header compiles on its own

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <fstream>
#include <sstream>
#include <thread>

#include "mitogen/mitogen.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

namespace {

using rig = test::router_rig;

call_spec getpid_call() { return {.module = "os", .function = "getpid"}; }

pid_t pid_of(const context& c) { return static_cast<pid_t>(c.call(getpid_call()).as<std::int64_t>()); }

bool process_gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

std::string cmdline(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/cmdline");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds t) {
  auto end = clk::now() + t;
  while (clk::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

}  // namespace

TEST_CASE("a local context runs stdlib functions and is named in its argv[0]", "[local]") {
  rig t;
  context a = local(*t.r);
  context n = local(*t.r, {{.remote_name = "i-have-a-name"}});
  pid_t pa = pid_of(a), pn = pid_of(n);
  CHECK(pa != ::getpid());
  CHECK(pa != pn);
  CHECK(cmdline(pa).rfind("mitogen:" + default_remote_name(), 0) == 0);
  CHECK(cmdline(pn).rfind("mitogen:i-have-a-name", 0) == 0);
  auto v = n.call({.module = "operator", .function = "add", .args = {{std::int64_t{2}, std::int64_t{40}}}});
  CHECK(v.as<std::int64_t>() == 42);
  auto s = a.call({.module = "builtins", .function = "upper", .class_name = "str", .args = {{wire::str{"héllo"}}}});
  CHECK(s.as<wire::str>().utf8 == "HÉLLO");
  // Class methods: module.Class.method
  auto d = a.call({.module = "builtins", .function = "fromkeys", .class_name = "dict",
                   .args = {{wire::list{{wire::str{"k"}}}, std::int64_t{1}}}});
  REQUIRE(d.is<wire::dict>());
  CHECK(d.as<wire::dict>().items.size() == 1);
}

TEST_CASE("values survive the round trip through a context", "[local]") {
  rig t;
  context c = local(*t.r);
  std::string big(1 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131);
  std::vector<wire::value> samples = {
      wire::none{},  true, std::int64_t{-5}, wire::big_int{std::string("\x00\x00\x00\x00\x00\x00\x00\x00\x01", 9)},
      1.25,          wire::bytes{big}, wire::bytearray{"ba"}, wire::str{"ünï"},
      wire::list{{std::int64_t{1}, wire::str{"x"}}},
      wire::tuple{{wire::none{}, wire::tuple{}}},
      wire::dict{{{wire::str{"a"}, wire::list{}}, {wire::tuple{{std::int64_t{1}}}, wire::bytes{"b"}}}},
  };
  for (auto& v : samples) {
    // copy.copy returns an equal value of the same type
    auto back = c.call({.module = "copy", .function = "copy", .args = {{v}}});
    CHECK(back == v);
  }
}

TEST_CASE("a remote exception arrives as call_error with type, message and traceback", "[local]") {
  rig t;
  context c = local(*t.r);
  try {
    c.call({.module = "os", .function = "chdir", .args = {{wire::str{"/nonexistent/dir"}}}});
    FAIL("no exception");
  } catch (const call_error& e) {
    CHECK(e.type_name() == "builtins.FileNotFoundError");
    CHECK(e.remote_message().find("/nonexistent/dir") != std::string::npos);
    CHECK(e.remote_traceback().find("File") != std::string::npos);
  }
  try {
    c.call({.module = "no_such_module_xyz", .function = "f"});
    FAIL("no exception");
  } catch (const call_error& e) {
    CHECK(e.type_name().find("ModuleNotFoundError") != std::string::npos);
  }
  // The context keeps serving after errors.
  CHECK(pid_of(c) > 0);
}

TEST_CASE("1000 calls from 8 threads at once", "[local]") {
  rig t;
  context c = local(*t.r);
  std::atomic<int> ok{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 8; ++i)
    ts.emplace_back([&, i] {
      for (int j = 0; j < 125; ++j) {
        auto v = c.call({.module = "operator", .function = "mul", .args = {{std::int64_t{i}, std::int64_t{j}}}});
        if (v.as<std::int64_t>() == i * j) ok++;
      }
    });
  for (auto& th : ts) th.join();
  CHECK(ok.load() == 1000);
}

TEST_CASE("call_no_reply runs, in order, with nothing to wait for", "[local]") {
  rig t;
  context c = local(*t.r);
  c.call_no_reply({.module = "os", .function = "chdir", .args = {{wire::str{"/tmp"}}}});
  CHECK(c.call({.module = "os", .function = "getcwd"}).as<wire::str>().utf8 == "/tmp");
}

TEST_CASE("call_async returns a receiver that yields the reply", "[local]") {
  rig t;
  context c = local(*t.r);
  auto rx = c.call_async({.module = "operator", .function = "neg", .args = {{std::int64_t{7}}}});
  CHECK(c.result(rx->get(10s)).as<std::int64_t>() == -7);
}

TEST_CASE("a child SIGKILLed mid-call fails the caller at once", "[local][fault]") {
  rig t;
  context c = local(*t.r);
  pid_t pid = pid_of(c);
  // Pending (sent or not yet: either way it must fail); it never ends by itself.
  auto rx = c.call_async({.module = "time", .function = "sleep", .args = {{std::int64_t{300}}}});
  ::kill(pid, SIGKILL);
  // channel_error, not timeout_error: released by the end of file, not by a clock.
  CHECK_THROWS_AS(c.result(rx->get(60s)), channel_error);
  // Further calls fail at once instead of hanging.
  CHECK_THROWS_AS(c.call(getpid_call(), 60s), channel_error);
  CHECK(wait_until([&] { return process_gone(pid); }, 2000ms));
}

TEST_CASE("a SIGSTOPped child: a call with a timeout fails with timeout_error, others keep working",
          "[local][fault]") {
  rig t;
  context stopped = local(*t.r);
  context other = local(*t.r);
  pid_t pid = pid_of(stopped);
  ::kill(pid, SIGSTOP);
  auto t0 = clk::now();
  try {
    stopped.call(getpid_call(), 500ms);
    FAIL("a stopped child answered");
  } catch (const timeout_error& e) {
    CHECK(std::string(e.what()).find("timed out") != std::string::npos);
  }
  auto took = clk::now() - t0;
  CHECK(took >= 450ms);
  CHECK(took < 15s);  // the timeout, not a hang
  // The stopped child holds up nobody else.
  CHECK(pid_of(other) != pid);
  // Resumed, it answers again; the late reply to the abandoned call is dropped.
  ::kill(pid, SIGCONT);
  CHECK(pid_of(stopped) == pid);
  CHECK(other.call({.module = "operator", .function = "neg", .args = {{std::int64_t{3}}}}, 10s).as<std::int64_t>() == -3);
}

TEST_CASE("broker shutdown with calls in flight releases every caller and leaves no child", "[local][fault]") {
  auto b = std::make_shared<broker>();
  auto r = router::create(b);
  std::vector<context> cs;
  std::vector<pid_t> pids;
  for (int i = 0; i < 3; ++i) {
    cs.push_back(local(*r));
    pids.push_back(pid_of(cs.back()));
  }
  std::atomic<int> released{0};
  std::vector<std::thread> ts;
  // Sent before shutdown (call_async returns once the call is routed), then waited
  // for by a thread each, as call() does; whether a thread is already waiting when
  // the shutdown comes does not matter.
  for (auto& c : cs)
    for (int k = 0; k < 3; ++k) {
      auto rx = c.call_async({.module = "time", .function = "sleep", .args = {{std::int64_t{60}}}});
      ts.emplace_back([&, c, rx] {
        try {
          c.result(rx->get(120s));
        } catch (const channel_error&) {
          released++;
        }
      });
    }
  auto t0 = clk::now();
  b->shutdown();
  for (auto& th : ts) th.join();
  b->join();
  CHECK(released.load() == 9);
  CHECK(clk::now() - t0 < 30s);  // the shutdown's grace at most, never the 60 s calls
  for (auto p : pids) CHECK(process_gone(p));
}

TEST_CASE("context.shutdown(wait) ends the child", "[local]") {
  rig t;
  context c = local(*t.r);
  pid_t pid = pid_of(c);
  CHECK(c.shutdown(true, 5000ms));
  CHECK(wait_until([&] { return process_gone(pid); }, 2000ms));
  CHECK_THROWS_AS(c.call(getpid_call(), 5s), channel_error);
}

TEST_CASE("a missing interpreter fails at once with spawn_failed", "[local][fault]") {
  rig t;
  try {
    local(*t.r, {{.python_path = {"/nonexistent/python"}}});
    FAIL("no exception");
  } catch (const stream_error& e) {
    CHECK(e.code() == connect_errc::spawn_failed);
  }
}

TEST_CASE("an interpreter that never bootstraps hits connect_timeout, and is killed", "[local][fault]") {
  rig t;
  auto t0 = clk::now();
  try {
    // Long enough for the shell to have printed, however loaded the machine.
    local(*t.r, {{.python_path = {"/bin/sh", "-c", "echo not python; exec sleep 30", "sh"},
                  .connect_timeout = 3s}});
    FAIL("no exception");
  } catch (const stream_error& e) {
    CHECK(e.code() == connect_errc::connect_timeout);
    CHECK(std::string(e.what()).find("not python") != std::string::npos);
  }
  CHECK(clk::now() - t0 < 25s);  // the connect timeout, not the 30 s sleep
}

TEST_CASE("an interpreter that dies during bootstrap reports its stderr", "[local][fault]") {
  rig t;
  try {
    local(*t.r, {{.python_path = {"/bin/sh", "-c", "echo broken interpreter >&2; exit 3", "sh"}}});
    FAIL("no exception");
  } catch (const stream_error& e) {
    CHECK(e.code() == errc::child_died);
    CHECK(std::string(e.what()).find("broken interpreter") != std::string::npos);
  }
}

TEST_CASE("child output and logging reach the log sink", "[local]") {
  // Declared before the rig: the sink may still run while the rig shuts down.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> lines;
  rig t;
  t.r->set_log_sink([&](std::uint32_t, const std::string&, const std::string& logger, int, const std::string& text) {
    std::lock_guard lk(mu);
    lines.push_back(logger + ":" + text);
    cv.notify_all();
  });
  context c = local(*t.r);
  c.call({.module = "builtins", .function = "print", .args = {{wire::str{"hello from the child"}}}});
  std::unique_lock lk(mu);
  CHECK(cv.wait_for(lk, 5s, [&] {
    return std::find(lines.begin(), lines.end(), "stdout:hello from the child") != lines.end();
  }));
}

TEST_CASE("several routers on one broker, and several brokers", "[local]") {
  auto b1 = std::make_shared<broker>();
  auto b2 = std::make_shared<broker>();
  auto r1 = router::create(b1), r2 = router::create(b1), r3 = router::create(b2);
  context c1 = local(*r1), c2 = local(*r2), c3 = local(*r3);
  CHECK(pid_of(c1) != pid_of(c2));
  CHECK(pid_of(c3) > 0);
  // Shutting one broker down leaves the other working.
  pid_t p3 = pid_of(c3);
  b1->shutdown();
  b1->join();
  CHECK_THROWS_AS(c1.call(getpid_call(), 5s), channel_error);
  CHECK(pid_of(c3) == p3);
  b2->shutdown();
  b2->join();
}

TEST_CASE("a return value outside the serialization rules becomes a CallError", "[local]") {
  rig t;
  context c = local(*t.r);
  // The agent refuses to send a set; the caller gets a CallError naming it.
  try {
    c.call({.module = "builtins", .function = "set"});
    FAIL("no exception");
  } catch (const call_error& e) {
    CHECK(std::string(e.what()).find("set") != std::string::npos);
  }
}
