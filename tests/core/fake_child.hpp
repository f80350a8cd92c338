#pragma once
// Test helper: a router with one hand-driven "child" on a socketpair.
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <memory>
#include <span>
#include <vector>

#include "mitogen/routing/router.hpp"
#include "mitogen/wire/constants.hpp"
#include "router_rig.hpp"
#include "mitogen/wire/frame.hpp"

namespace mitogen::test {

/// The far end of a socketpair, playing a child context by hand.
struct fake_child {
  int fd = -1;
  wire::frame_parser parser;
  std::vector<std::uint8_t> buf = std::vector<std::uint8_t>(1 << 16);
  std::span<const std::uint8_t> pending;

  fake_child() = default;
  fake_child(const fake_child&) = delete;
  fake_child& operator=(const fake_child&) = delete;
  ~fake_child() {
    if (fd >= 0) ::close(fd);
  }

  /// Read one message (fails the test after 5 s).
  wire::message recv() {
    wire::message m;
    for (;;) {
      if (!pending.empty() && parser.parse(pending, m) == wire::frame_parser::status::good) return m;
      timeval tv{5, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      ssize_t n = ::read(fd, buf.data(), buf.size());
      REQUIRE(n > 0);
      pending = std::span<const std::uint8_t>(buf.data(), static_cast<std::size_t>(n));
    }
  }
  void send(const wire::message& m) {
    auto f = wire::encode_frame(m);
    REQUIRE(::write(fd, f.data(), f.size()) == static_cast<ssize_t>(f.size()));
  }
};

/// A router with one fake child attached as context `id`.
struct rig : router_rig {
  fake_child child;
  std::shared_ptr<stream> s;
  std::uint32_t id = 0;

  /// `leader_reads`: callers waiting for this child's replies read them themselves.
  /// `max_queued`: the stream's max_queued_bytes (0: the default).
  explicit rig(bool leader_reads = false, std::size_t max_queued = 0) {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    child.fd = sv[1];
    id = r->allocate_id();
    stream_options opts{.name = "fake", .leader_reads = leader_reads};
    if (max_queued) opts.max_queued_bytes = max_queued;
    s = stream::create(b, sv[0], sv[0], std::move(opts));
    r->add_route(id, "fake", s);
    s->start();
  }
  ~rig() {
    // Shut down before closing our end, as router_rig's destructor runs after this.
    b->shutdown();
    b->join();
    if (child.fd >= 0) ::close(child.fd);
    child.fd = -1;
  }
  wire::message reply_to(const wire::message& req, std::string data) {
    wire::message m;
    m.dst_id = 0;
    m.src_id = m.auth_id = id;
    m.handle = req.reply_to;
    m.data = std::move(data);
    return m;
  }
};

/// A router with two fake children, A and B (attach() adds more).
struct two_children : test::router_rig {
  fake_child a, b;
  std::uint32_t a_id = 0, b_id = 0;

  two_children() {
    attach(a, a_id, "A");
    attach(b, b_id, "B");
  }
  /// Attach `c` as a new context (a child, or with opts.trusted a client).
  void attach(fake_child& c, std::uint32_t& id, const char* name, route_options opts = {}) {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    c.fd = sv[1];
    id = r->allocate_id();
    auto s = stream::create(router_rig::b, sv[0], sv[0], {.name = name});
    r->add_route(id, name, s, opts);
    s->start();
  }
  ~two_children() {
    // Before the children's ends close (members go after this body).
    router_rig::b->shutdown();
    router_rig::b->join();
  }
  /// A message from `src` (acting as `auth`) sent on fake child `c`'s stream.
  static void send(fake_child& c, std::uint32_t dst, std::uint32_t src, std::uint32_t handle, std::string data,
                   std::uint32_t reply_to = 0, std::optional<std::uint32_t> auth = std::nullopt) {
    wire::message m;
    m.dst_id = dst;
    m.src_id = src;
    m.auth_id = auth.value_or(src);
    m.handle = handle;
    m.reply_to = reply_to;
    m.data = std::move(data);
    c.send(m);
  }
  /// Wait until the router (broker thread) has handled everything sent so far on `c`:
  /// a round trip to a handle nobody listens on comes back dead.
  void sync(fake_child& c, std::uint32_t me) {
    send(c, 0, me, 4242, "", 77);
    auto m = c.recv();
    REQUIRE(m.is_dead());
    REQUIRE(m.handle == 77);
  }
  std::shared_ptr<receiver> call(std::uint32_t dst) {
    auto rx = r->make_receiver(dst, false);
    wire::message m;
    m.dst_id = dst;
    m.handle = wire::CALL_FUNCTION;
    m.reply_to = rx->handle();
    r->route(m);
    return rx;
  }
};


}  // namespace mitogen::test
