#pragma once
// Test helper: a router with one hand-driven "child" on a socketpair.
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <memory>
#include <span>
#include <vector>

#include "mitogen/routing/router.hpp"
#include "router_rig.hpp"
#include "mitogen/wire/frame.hpp"

namespace mitogen::test {

/// The far end of a socketpair, playing a child context by hand.
struct fake_child {
  int fd = -1;
  wire::frame_parser parser;
  std::vector<std::uint8_t> buf = std::vector<std::uint8_t>(1 << 16);
  std::span<const std::uint8_t> pending;

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

  rig() {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    child.fd = sv[1];
    id = r->allocate_id();
    s = stream::create(b, sv[0], sv[0], {.name = "fake"});
    r->add_route(id, "fake", s);
    s->start();
  }
  ~rig() {
    // Shut down before closing our end, as router_rig's destructor runs after this.
    b->shutdown();
    b->join();
    if (child.fd >= 0) ::close(child.fd);
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

}  // namespace mitogen::test
