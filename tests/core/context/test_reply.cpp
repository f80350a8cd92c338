// Replies from a hostile or broken child, played by hand over a socketpair.
#include "mitogen/context/context.hpp"  // first: the header compiles on its own

#include <catch2/catch.hpp>

#include "fake_child.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/wire/pickle.hpp"

using namespace mitogen;
using namespace std::chrono_literals;

TEST_CASE("a reply with a forbidden global fails the call and drops the context", "[reply]") {
  test::rig t;
  context c(t.r, t.id, "fake");
  auto rx = c.call_async({.module = "os", .function = "getpid"});
  auto req = t.child.recv();
  CHECK(req.handle == wire::CALL_FUNCTION);
  // pickle.dumps(os.system, 2): GLOBAL 'posix system'
  t.child.send(t.reply_to(req, "\x80\x02" "cposix\nsystem\nq\x00."));
  try {
    c.result(rx->get(5s));
    FAIL("no exception");
  } catch (const stream_error& e) {
    CHECK(e.code() == errc::protocol_error);
    CHECK(std::string(e.what()).find("posix.system") != std::string::npos);
  }
  // The hostile stream is closed: the fake child reads EOF.
  char ch;
  CHECK(::read(t.child.fd, &ch, 1) == 0);
  CHECK_THROWS_AS(c.call({.module = "os", .function = "getpid"}, 5s), channel_error);
}

TEST_CASE("a reply nested too deep is refused without crashing", "[reply]") {
  test::rig t;
  context c(t.r, t.id, "fake");
  auto rx = c.call_async({.module = "os", .function = "getpid"});
  auto req = t.child.recv();
  // 5000 lists each appended into the one before: nesting far beyond the limit.
  std::string nest = "\x80\x02]";
  for (int i = 0; i < 5000; ++i) nest += "]";
  for (int i = 0; i < 5000; ++i) nest += "a";
  nest += ".";
  t.child.send(t.reply_to(req, nest));
  CHECK_THROWS_AS(c.result(rx->get(5s)), stream_error);
}

TEST_CASE("a CallError reply carries the remote text", "[reply]") {
  test::rig t;
  context c(t.r, t.id, "fake");
  auto rx = c.call_async({.module = "os", .function = "getpid"});
  auto req = t.child.recv();
  wire::value err = wire::call_error{"builtins.ValueError: bad\n  File \"x.py\", line 1\n"};
  t.child.send(t.reply_to(req, wire::encode(err)));
  try {
    c.result(rx->get(5s));
    FAIL("no exception");
  } catch (const call_error& e) {
    CHECK(e.type_name() == "builtins.ValueError");
    CHECK(e.remote_message() == "bad");
    CHECK(e.remote_traceback().find("x.py") != std::string::npos);
  }
}
