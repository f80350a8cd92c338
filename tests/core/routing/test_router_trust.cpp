// Who may reach whom through the master's router (docs/security.md, issue 10):
// unidirectional mode, trusted client streams (their messages act with the master's
// authority), forwarding grants for Senders handed over, DEL_ROUTE to clients.
#include <catch2/catch.hpp>

#include "fake_child.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/constants.hpp"

using namespace mitogen;
using mitogen::test::fake_child;
using mitogen::test::two_children;

namespace {

/// Child `c` (context `me`) sends `m`-like CALL_FUNCTION to `dst`, asking for a reply
/// on handle 55; returns what comes back to it.
wire::message attack(two_children& t, fake_child& c, std::uint32_t me, std::uint32_t dst,
                     std::uint32_t handle = wire::CALL_FUNCTION) {
  two_children::send(c, dst, me, handle, "payload", 55);
  return c.recv();
}

/// Nothing is waiting on `c` (context `me`): a sync round trip returns only its own
/// dead reply.
void nothing_arrived(two_children& t, fake_child& c, std::uint32_t me) { t.sync(c, me); }

}  // namespace

TEST_CASE("permissive router: a child's message to a sibling arrives with its true auth_id", "[router][trust]") {
  two_children t;
  REQUIRE_FALSE(t.r->unidirectional());
  two_children::send(t.a, t.b_id, t.a_id, wire::CALL_FUNCTION, "x", 55);
  auto m = t.b.recv();
  CHECK(m.handle == wire::CALL_FUNCTION);
  CHECK(m.src_id == t.a_id);
  CHECK(m.auth_id == t.a_id);  // never the master's: the sibling's agent refuses it
}

TEST_CASE("unidirectional router: a child cannot reach a sibling, and is told so", "[router][trust]") {
  two_children t;
  t.r->set_unidirectional(true);
  for (auto handle : {wire::CALL_FUNCTION, wire::SHUTDOWN, wire::LOAD_MODULE, std::uint32_t{1234}}) {
    auto reply = attack(t, t.a, t.a_id, t.b_id, handle);
    CHECK(reply.is_dead());
    CHECK(reply.handle == 55);
    CHECK(reply.data.find("unidirectional") != std::string::npos);
  }
  nothing_arrived(t, t.b, t.b_id);
  // ... nor a descendant of its sibling.
  auto first = t.r->allocate_id_via(t.b_id);
  two_children::send(t.b, 0, t.b_id, wire::ADD_ROUTE, std::to_string(first) + ":grandchild");
  t.sync(t.b, t.b_id);
  REQUIRE(t.r->routed_via(first) == t.b_id);
  auto reply = attack(t, t.a, t.a_id, first);
  CHECK(reply.is_dead());
  nothing_arrived(t, t.b, t.b_id);
  // The master still reaches both.
  auto rx = t.call(t.b_id);
  auto call = t.b.recv();
  CHECK(call.handle == wire::CALL_FUNCTION);
  CHECK(call.auth_id == 0);
}

TEST_CASE("unidirectional router: allow_forward lets one context reach one handle", "[router][trust]") {
  two_children t;
  t.r->set_unidirectional(true);
  t.r->allow_forward(t.a_id, t.b_id, 3000);
  two_children::send(t.a, t.b_id, t.a_id, 3000, "item");
  auto m = t.b.recv();
  CHECK(m.handle == 3000);
  CHECK(m.data == "item");
  CHECK(m.src_id == t.a_id);
  // Not another handle, and not the other way round.
  CHECK(attack(t, t.a, t.a_id, t.b_id, 3001).is_dead());
  CHECK(attack(t, t.b, t.b_id, t.a_id, 3000).is_dead());
  nothing_arrived(t, t.a, t.a_id);
  nothing_arrived(t, t.b, t.b_id);
}

TEST_CASE("a trusted client acts with the master's authority; children may answer it", "[router][trust]") {
  two_children t;
  t.r->set_unidirectional(true);
  fake_child client;
  std::uint32_t client_id = 0;
  t.attach(client, client_id, "client", {.trusted = true});
  // Client -> child: forwarded with auth_id rewritten to the master's.
  two_children::send(client, t.a_id, client_id, wire::CALL_FUNCTION, "call", 4000);
  auto m = t.a.recv();
  CHECK(m.handle == wire::CALL_FUNCTION);
  CHECK(m.src_id == client_id);
  CHECK(m.auth_id == 0);
  CHECK(m.reply_to == 4000);
  // Child -> client (the reply): forwarded although the router is unidirectional.
  two_children::send(t.a, client_id, t.a_id, 4000, "result");
  auto r = client.recv();
  CHECK(r.handle == 4000);
  CHECK(r.data == "result");
  CHECK(r.src_id == t.a_id);
  // A client still cannot claim another identity.
  two_children::send(client, t.a_id, t.b_id, wire::CALL_FUNCTION, "forged", 4001);
  nothing_arrived(t, t.a, t.a_id);
}

TEST_CASE("a trusted client hears DEL_ROUTE when a context disconnects", "[router][trust]") {
  two_children t;
  fake_child client;
  std::uint32_t client_id = 0;
  t.attach(client, client_id, "client", {.trusted = true});
  ::close(t.a.fd);
  t.a.fd = -1;
  REQUIRE(t.r->wait_disconnected(t.a_id, std::chrono::seconds(5)));
  auto m = client.recv();
  CHECK(m.handle == wire::DEL_ROUTE);
  CHECK(m.dst_id == client_id);
  CHECK(m.src_id == 0);
  CHECK(m.data == std::to_string(t.a_id));
}
