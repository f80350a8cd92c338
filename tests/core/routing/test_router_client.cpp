// A client router (router::create_client): a process attached to another program's
// router as a trusted client, as an Ansible worker attaches to mitogen-mux. The
// "daemon" here is a real router with two fake children; the client is a second
// router on its own broker, connected over a socketpair.
#include <sys/socket.h>

#include <catch2/catch.hpp>

#include "fake_child.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/constants.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using mitogen::test::two_children;

namespace {

/// The daemon (two_children: a router with fake children A and B) plus one client.
struct daemon_and_client : two_children {
  std::shared_ptr<broker> cb = std::make_shared<broker>();
  std::shared_ptr<router> client;
  std::uint32_t client_id = 0;
  std::shared_ptr<stream> daemon_side;

  daemon_and_client() {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    client_id = r->allocate_id();
    daemon_side = stream::create(router_rig::b, sv[0], sv[0], {.name = "client"});
    r->add_route(client_id, "client", daemon_side, {.trusted = true});
    daemon_side->start();
    auto up = stream::create(cb, sv[1], sv[1], {.name = "mux"});
    client = router::create_client(cb, client_id, 0, up, "mux");
  }
  ~daemon_and_client() {
    cb->shutdown();
    cb->join();
  }
  /// The client calls context `dst`: returns the receiver waiting for the reply.
  std::shared_ptr<receiver> call(std::uint32_t dst) {
    auto rx = client->make_receiver(dst, false);
    wire::message m;
    m.dst_id = dst;
    m.handle = wire::CALL_FUNCTION;
    m.reply_to = rx->handle();
    m.data = "call";
    client->route(std::move(m));
    return rx;
  }
};

}  // namespace

TEST_CASE("client router: calls reach a context through the parent with its authority", "[router][client]") {
  daemon_and_client t;
  t.r->set_unidirectional(true);
  REQUIRE(t.client->context_id() == t.client_id);
  REQUIRE(t.client->parent_id() == 0u);
  auto rx = t.call(t.a_id);
  auto m = t.a.recv();
  CHECK(m.handle == wire::CALL_FUNCTION);
  CHECK(m.src_id == t.client_id);
  CHECK(m.auth_id == 0);  // rewritten by the daemon: the client is trusted
  two_children::send(t.a, t.client_id, t.a_id, m.reply_to, "result");
  auto reply = rx->get(5s);
  CHECK_FALSE(reply.is_dead());
  CHECK(reply.data == "result");
  CHECK(reply.src_id == t.a_id);
}

TEST_CASE("client router: only the context called may answer", "[router][client]") {
  daemon_and_client t;
  auto rx = t.call(t.a_id);
  auto m = t.a.recv();
  // B answers A's call first: the client drops it (B reaches it, since the client
  // is trusted, but the reply handle names its respondent).
  two_children::send(t.b, t.client_id, t.b_id, m.reply_to, "forged");
  two_children::send(t.a, t.client_id, t.a_id, m.reply_to, "genuine");
  CHECK(rx->get(5s).data == "genuine");
  // A message to a handle nobody registered gets a dead reply.
  two_children::send(t.b, t.client_id, t.b_id, 5555, "junk", 66);
  auto dead = t.b.recv();
  CHECK(dead.is_dead());
  CHECK(dead.handle == 66);
}

TEST_CASE("client router: a context that dies releases the client's caller at once", "[router][client]") {
  daemon_and_client t;
  auto rx = t.call(t.a_id);
  (void)t.a.recv();
  ::close(t.a.fd);
  t.a.fd = -1;
  auto m = rx->get(5s);
  CHECK(m.is_dead());
  CHECK(m.data.find("disconnected") != std::string::npos);
}

TEST_CASE("client router: losing the parent releases every caller", "[router][client]") {
  daemon_and_client t;
  auto ra = t.call(t.a_id);
  auto rb = t.call(t.b_id);
  (void)t.a.recv();
  (void)t.b.recv();
  t.daemon_side->close(make_error_code(errc::broker_shut_down), "daemon went away");
  for (auto* rx : {&ra, &rb}) {
    auto m = (*rx)->get(5s);
    CHECK(m.is_dead());
    CHECK(m.data.find("unreachable") != std::string::npos);
  }
  // Later calls fail at once too.
  CHECK(t.call(t.a_id)->get(5s).is_dead());
}

TEST_CASE("client router: shutting it down hangs up without shutting the parent down", "[router][client]") {
  daemon_and_client t;
  t.cb->shutdown();
  t.cb->join();
  REQUIRE(t.r->wait_disconnected(t.client_id, 5s));
  // The daemon and its children are unaffected.
  auto rx = t.two_children::call(t.a_id);
  CHECK(t.a.recv().handle == wire::CALL_FUNCTION);
}
