// via= routing in the master's router: route table, ADD_ROUTE/DEL_ROUTE/ALLOCATE_ID,
// source verification for descendants, sibling forwarding, dead fan-out. Two hand-
// driven "children" on socketpairs play intermediaries.
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "fake_child.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/pickle.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using mitogen::test::fake_child;

using mitogen::test::two_children;

TEST_CASE("ADD_ROUTE for an id allocated via a child routes that id through the child", "[router][via]") {
  two_children t;
  const auto g = t.r->allocate_id_via(t.a_id);
  t.send(t.a, 0, t.a_id, wire::ADD_ROUTE, std::to_string(g) + ":grandchild");
  t.sync(t.a, t.a_id);
  CHECK(t.r->routed_via(g) == t.a_id);
  CHECK(t.r->name_of(g) == "grandchild");
  // A call to it goes down A's stream; the reply, sourced from g, is accepted.
  auto rx = t.call(g);
  auto req = t.a.recv();
  CHECK(req.dst_id == g);
  CHECK(req.handle == wire::CALL_FUNCTION);
  t.send(t.a, 0, g, req.reply_to, wire::encode(wire::value(std::int64_t{42})));
  auto rep = rx->get(5s);
  REQUIRE_FALSE(rep.is_dead());
  CHECK(rep.src_id == g);
}

TEST_CASE("ADD_ROUTE for ids a child does not own is refused", "[router][via]") {
  two_children t;
  const auto for_b = t.r->allocate_id_via(t.b_id);
  // 0, the master, a sibling, an id never allocated, B's id, garbage.
  for (std::string bad : {std::string("0:evil"), std::to_string(t.b_id) + ":evil", std::string("99999:evil"),
                          std::to_string(for_b) + ":evil", std::string("x1:evil"), std::string("")})
    t.send(t.a, 0, t.a_id, wire::ADD_ROUTE, bad);
  t.sync(t.a, t.a_id);
  CHECK(t.r->routed_via(t.b_id) == t.b_id);  // B still reached directly
  CHECK(t.r->routed_via(for_b) == 0);
  CHECK(t.r->routed_via(99999) == 0);
  CHECK(t.r->routed_via(0) == 0);
  // B can still claim its own id.
  t.send(t.b, 0, t.b_id, wire::ADD_ROUTE, std::to_string(for_b) + ":mine");
  t.sync(t.b, t.b_id);
  CHECK(t.r->routed_via(for_b) == t.b_id);
}

TEST_CASE("a child cannot speak for a descendant routed through another child", "[router][via]") {
  two_children t;
  const auto gb = t.r->allocate_id_via(t.b_id);
  t.send(t.b, 0, t.b_id, wire::ADD_ROUTE, std::to_string(gb) + ":gb");
  t.sync(t.b, t.b_id);
  auto rx = t.call(gb);
  auto req = t.b.recv();
  // A forges the reply as src gb (a descendant of B), then as auth gb.
  t.send(t.a, 0, gb, req.reply_to, wire::encode(wire::value(wire::str{"forged"})));
  t.send(t.a, 0, t.a_id, req.reply_to, wire::encode(wire::value(wire::str{"forged"})), 0, gb);
  t.sync(t.a, t.a_id);
  CHECK_FALSE(rx->try_get().has_value());
  // The genuine reply through B still arrives.
  t.send(t.b, 0, gb, req.reply_to, wire::encode(wire::value(wire::str{"real"})));
  auto rep = rx->get(5s);
  REQUIRE_FALSE(rep.is_dead());
  CHECK(wire::decode(rep.data).v == wire::value(wire::str{"real"}));
}

TEST_CASE("siblings message each other through the master with their own src", "[router][via]") {
  two_children t;
  const auto gb = t.r->allocate_id_via(t.b_id);
  t.send(t.b, 0, t.b_id, wire::ADD_ROUTE, std::to_string(gb) + ":gb");
  t.sync(t.b, t.b_id);
  t.send(t.a, gb, t.a_id, 1234, "hello", 55);
  auto got = t.b.recv();
  CHECK(got.dst_id == gb);
  CHECK(got.src_id == t.a_id);
  CHECK(got.auth_id == t.a_id);
  CHECK(got.handle == 1234);
  CHECK(got.data == "hello");
  // To an unknown context: a dead reply, at once.
  t.send(t.a, 31337, t.a_id, 1234, "hello", 56);
  auto dead = t.a.recv();
  CHECK(dead.is_dead());
  CHECK(dead.handle == 56);
  CHECK(dead.data.find("no route to context 31337") != std::string::npos);
}

TEST_CASE("an intermediary's disconnect fails every call pending on its descendants at once", "[router][via]") {
  two_children t;
  const auto g1 = t.r->allocate_id_via(t.a_id);
  t.send(t.a, 0, t.a_id, wire::ADD_ROUTE, std::to_string(g1) + ":g1");
  t.sync(t.a, t.a_id);
  const auto g2 = t.r->allocate_id_via(g1);  // a great-grandchild, started by g1
  CHECK(t.r->routed_via(g1) == t.a_id);
  t.send(t.a, 0, g1, wire::ADD_ROUTE, std::to_string(g2) + ":g2");
  t.sync(t.a, t.a_id);
  REQUIRE(t.r->routed_via(g2) == t.a_id);
  std::vector<std::shared_ptr<receiver>> rxs;
  for (auto id : {t.a_id, g1, g2, g2}) rxs.push_back(t.call(id));
  auto other = t.call(t.b_id);
  for (int i = 0; i < 4; ++i) t.a.recv();
  auto t0 = std::chrono::steady_clock::now();
  ::close(t.a.fd);
  t.a.fd = -1;
  for (auto& rx : rxs) {
    auto m = rx->get(30s);
    CHECK(m.is_dead());
    CHECK(m.data.find("disconnected") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - t0 < 15s);  // released by the close, not a timeout
  CHECK(t.r->wait_disconnected(g2, 1s));
  CHECK(t.r->routed_via(g1) == 0);
  // New calls to a descendant fail at once; B is unaffected.
  auto late = t.call(g2)->get(2s);
  CHECK(late.is_dead());
  CHECK_FALSE(other->try_get().has_value());
}

TEST_CASE("DEL_ROUTE removes a descendant and its subtree and fails their calls", "[router][via]") {
  two_children t;
  const auto g1 = t.r->allocate_id_via(t.a_id);
  t.send(t.a, 0, t.a_id, wire::ADD_ROUTE, std::to_string(g1) + ":g1");
  const auto g2 = t.r->allocate_id_via(t.a_id);
  t.send(t.a, 0, g1, wire::ADD_ROUTE, std::to_string(g2) + ":g2");
  t.sync(t.a, t.a_id);
  auto rx1 = t.call(g1);
  auto rx2 = t.call(g2);
  t.a.recv();
  t.a.recv();
  // B cannot delete A's routes; A cannot delete itself.
  t.send(t.b, 0, t.b_id, wire::DEL_ROUTE, std::to_string(g1));
  t.send(t.a, 0, t.a_id, wire::DEL_ROUTE, std::to_string(t.a_id));
  t.sync(t.b, t.b_id);
  t.sync(t.a, t.a_id);
  CHECK(t.r->routed_via(g1) == t.a_id);
  CHECK_FALSE(rx1->try_get().has_value());
  t.send(t.a, 0, t.a_id, wire::DEL_ROUTE, std::to_string(g1));
  for (auto* rx : {&rx1, &rx2}) {
    auto m = (*rx)->get(5s);
    CHECK(m.is_dead());
    CHECK(m.data.find("reported it gone") != std::string::npos);
  }
  CHECK(t.r->routed_via(g1) == 0);
  CHECK(t.r->routed_via(g2) == 0);
  CHECK(t.r->wait_disconnected(g1, 1s));
  CHECK(t.r->routed_via(t.a_id) == t.a_id);
}

TEST_CASE("ALLOCATE_ID answers a block of ids that only the asking subtree may route", "[router][via]") {
  two_children t;
  t.send(t.a, 0, t.a_id, wire::ALLOCATE_ID, "", 99);
  auto rep = t.a.recv();
  REQUIRE_FALSE(rep.is_dead());
  CHECK(rep.handle == 99);
  auto v = wire::decode(rep.data);
  REQUIRE(v);
  REQUIRE(v.v.is<wire::tuple>());
  auto& items = v.v.as<wire::tuple>().items;
  REQUIRE(items.size() == 2);
  const auto first = static_cast<std::uint32_t>(items[0].as<std::int64_t>());
  const auto end = static_cast<std::uint32_t>(items[1].as<std::int64_t>());
  CHECK(end - first == router::id_block_size);
  CHECK(first > t.b_id);
  // Ids allocated later do not overlap the block.
  CHECK(t.r->allocate_id() >= end);
  t.send(t.b, 0, t.b_id, wire::ADD_ROUTE, std::to_string(first + 1) + ":stolen");
  t.send(t.a, 0, t.a_id, wire::ADD_ROUTE, std::to_string(first + 5) + ":ok");
  t.sync(t.b, t.b_id);
  t.sync(t.a, t.a_id);
  CHECK(t.r->routed_via(first + 1) == 0);
  CHECK(t.r->routed_via(first + 5) == t.a_id);
  // The number of blocks a subtree may hold is bounded.
  for (std::size_t i = 1; i < router::max_blocks_per_child; ++i) {
    t.send(t.a, 0, t.a_id, wire::ALLOCATE_ID, "", 100);
    CHECK_FALSE(t.a.recv().is_dead());
  }
  t.send(t.a, 0, t.a_id, wire::ALLOCATE_ID, "", 101);
  auto refused = t.a.recv();
  CHECK(refused.is_dead());
  CHECK(refused.data.find("block limit") != std::string::npos);
}

TEST_CASE("forwarding to a sibling that does not read is bounded", "[router][via]") {
  two_children t;
  // B reads nothing. A sends it 80 MiB in 1 MiB messages: past 64 MiB queued
  // (plus what the socket buffers hold) the master refuses them.
  const std::string mib(1 << 20, 'x');
  for (int i = 0; i < 80; ++i) t.send(t.a, t.b_id, t.a_id, 1234, mib, 500);
  t.send(t.a, 0, t.a_id, 4242, "", 77);  // a probe: its dead reply comes last
  int refused = 0;
  for (;;) {
    auto m = t.a.recv();
    REQUIRE(m.is_dead());
    if (m.handle == 77) break;
    CHECK(m.handle == 500);
    CHECK(m.data.find("is not reading") != std::string::npos);
    ++refused;
  }
  CHECK(refused >= 10);
  CHECK(refused <= 16);
  CHECK(t.r->stream_for(t.b_id)->queued_bytes() <= (65u << 20));
}
