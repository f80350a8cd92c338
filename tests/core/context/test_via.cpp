// local() through other contexts (connect_options::via) with real agents: who
// spawned whom, calls through two intermediaries, and failure fan-out.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <thread>

#include "mitogen/context/errors.hpp"
#include "mitogen/mitogen.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

namespace {

std::int64_t call_int(const context& c, const char* fn) {
  return c.call({.module = "os", .function = fn}, 20s).as<std::int64_t>();
}

local_options via(const context& c) {
  local_options o;
  o.via = c;
  return o;
}

}  // namespace

TEST_CASE("local(via=) chains: each context is started by the one before", "[via]") {
  test::router_rig t;
  context a = local(*t.r);
  context b = local(*t.r, via(a));
  context c = local(*t.r, via(b));
  CHECK(call_int(a, "getppid") == ::getpid());
  CHECK(call_int(b, "getppid") == call_int(a, "getpid"));
  CHECK(call_int(c, "getppid") == call_int(b, "getpid"));
  CHECK(t.r->routed_via(c.id()) == a.id());
  CHECK(c.name().rfind(b.name() + ".local.", 0) == 0);
}

TEST_CASE("killing an intermediary fails the calls pending on its descendants at once", "[via]") {
  test::router_rig t;
  context a = local(*t.r);
  context b = local(*t.r, via(a));
  context c = local(*t.r, via(b));
  auto pa = static_cast<pid_t>(call_int(a, "getpid"));
  // Pending (sent or still on their way: either way they must fail); they never
  // end by themselves.
  auto rb = b.call_async({.module = "time", .function = "sleep", .args = {{300.0}}});
  auto rc = c.call_async({.module = "time", .function = "sleep", .args = {{300.0}}});
  ::kill(pa, SIGKILL);
  for (auto* rx : {&rb, &rc}) {
    auto m = (*rx)->get(60s);  // a dead message, not a timeout
    REQUIRE(m.is_dead());
    CHECK(m.data.find("disconnected") != std::string::npos);
  }
  CHECK_THROWS_AS(c.call({.module = "os", .function = "getpid"}, 60s), channel_error);
}

TEST_CASE("a failed start through a context is a stream_error with the reason", "[via]") {
  test::router_rig t;
  context a = local(*t.r);
  local_options o = via(a);
  o.python_path = {"/nonexistent/python3"};
  try {
    local(*t.r, o);
    FAIL("local() did not throw");
  } catch (const stream_error& e) {
    CHECK(e.code() == connect_errc::spawn_failed);
    CHECK(std::string(e.what()).find("/nonexistent/python3") != std::string::npos);
  }
  // The intermediary is fine.
  CHECK(call_int(local(*t.r, via(a)), "getppid") == call_int(a, "getpid"));
  a.shutdown(true);
  CHECK_THROWS_AS(local(*t.r, via(a)), channel_error);
}
