#include "mitogen/mux/client.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <system_error>
#include <vector>

#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/mux/protocol.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen::mux {
namespace {

using clock = std::chrono::steady_clock;

/// Read exactly `n` bytes before `deadline` (blocking socket, poll for the time).
/// Reads no further: what follows MUX_HELLO belongs to the stream.
void read_exactly(int fd, char* out, std::size_t n, clock::time_point deadline, const std::string& path) {
  std::size_t got = 0;
  while (got < n) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
    if (left <= 0)
      throw stream_error(make_error_code(connect_errc::connect_timeout), "mitogen-mux: no greeting from the daemon at " + path);
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left));
    if (rc < 0 && errno == EINTR) continue;
    if (rc <= 0) continue;
    ssize_t r = ::read(fd, out + got, n - got);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    // A daemon that is dying (or refusing us) hangs up here: as good as none.
    if (r <= 0)
      throw std::system_error(r < 0 ? errno : ECONNRESET, std::generic_category(),
                              "mitogen-mux: the daemon at " + path + " hung up before greeting us");
    got += static_cast<std::size_t>(r);
  }
}

/// Objects of clients abandoned in forked children: never destroyed (see abandon()).
std::vector<std::shared_ptr<void>>& graveyard() {
  static auto* g = new std::vector<std::shared_ptr<void>>();
  return *g;
}
std::mutex graveyard_mu;

}  // namespace

std::shared_ptr<client> client::attach(const std::string& socket_path, std::chrono::milliseconds timeout) {
  const auto deadline = clock::now() + timeout;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof addr.sun_path)
    throw std::system_error(ENAMETOOLONG, std::generic_category(), "mitogen-mux: socket path too long: " + socket_path);
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "mitogen-mux: socket()");
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int e = errno;
    ::close(fd);
    throw std::system_error(e, std::generic_category(), "mitogen-mux: cannot connect to " + socket_path);
  }
  try {
    // MUX_HELLO, read by hand so that not one byte more is taken from the socket.
    char hdr[wire::header_len];
    read_exactly(fd, hdr, sizeof hdr, deadline, socket_path);
    wire::frame_parser parser(4096);
    wire::message m;
    std::span<const std::uint8_t> in(reinterpret_cast<const std::uint8_t*>(hdr), sizeof hdr);
    auto st = parser.parse(in, m);
    if (st == wire::frame_parser::status::bad)
      throw stream_error(make_error_code(errc::protocol_error),
                         "mitogen-mux: " + socket_path + " did not greet us like a mitogen-mux daemon (" +
                             parser.error().message() + ")");
    if (st == wire::frame_parser::status::need_more) {
      const std::size_t len = (static_cast<std::uint8_t>(hdr[22]) << 24) | (static_cast<std::uint8_t>(hdr[23]) << 16) |
                              (static_cast<std::uint8_t>(hdr[24]) << 8) | static_cast<std::uint8_t>(hdr[25]);
      std::string body(len, '\0');
      read_exactly(fd, body.data(), len, deadline, socket_path);
      std::span<const std::uint8_t> rest(reinterpret_cast<const std::uint8_t*>(body.data()), body.size());
      st = parser.parse(rest, m);
    }
    std::optional<hello> h;
    if (st == wire::frame_parser::status::good && m.handle == wire::MUX_HELLO && m.src_id == wire::master_id)
      h = decode_hello(m.data);
    if (!h || h->context_id != m.dst_id)
      throw stream_error(make_error_code(errc::protocol_error),
                         "mitogen-mux: " + socket_path + " did not greet us like a mitogen-mux daemon");
    if (h->version != protocol_version)
      throw stream_error(make_error_code(errc::protocol_error),
                         "mitogen-mux: the daemon at " + socket_path + " speaks version " + std::to_string(h->version) +
                             ", we speak " + std::to_string(protocol_version) + " (stop it: mitogen-mux stop)");
    auto c = std::shared_ptr<client>(new client());
    c->fd_ = fd;
    c->id_ = h->context_id;
    c->daemon_pid_ = h->pid;
    c->owner_pid_ = ::getpid();
    c->broker_ = std::make_shared<broker>();
    auto s = stream::create(c->broker_, fd, fd, {.name = "mitogen-mux", .leader_reads = true});
    c->router_ = router::create_client(c->broker_, c->id_, wire::master_id, s, "mitogen-mux");
    return c;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

client::~client() {
  if (!detached_) detach();
}

std::shared_ptr<receiver> client::request(std::uint32_t handle, std::string payload) {
  auto rx = router_->make_receiver(wire::master_id, /*persist=*/false);
  wire::message m;
  m.dst_id = wire::master_id;
  m.handle = handle;
  m.reply_to = rx->handle();
  m.data = std::move(payload);
  router_->route(std::move(m));
  return rx;
}

wire::value client::call(std::uint32_t handle, std::string payload) {
  auto rx = request(handle, std::move(payload));
  return decode_reply(rx->get());
}

context client::connected(const wire::message& reply) {
  wire::value v = decode_reply(reply);
  if (v.is<wire::tuple>()) {
    const auto& t = v.as<wire::tuple>().items;
    if (t.size() == 2 && t[0].is<std::int64_t>() && t[1].is<wire::str>() && t[0].as<std::int64_t>() > 0 &&
        t[0].as<std::int64_t>() <= 0xffffffffLL)
      return context(router_, static_cast<std::uint32_t>(t[0].as<std::int64_t>()), t[1].as<wire::str>().utf8);
  }
  throw stream_error(make_error_code(errc::protocol_error), "mitogen-mux: bad MUX_CONNECT reply: " + wire::describe(v));
}

context client::connect(const wire::value& stack) {
  auto rx = request(wire::MUX_CONNECT, wire::encode(stack));
  return connected(rx->get());
}

std::int64_t client::reset(const wire::value& stack) {
  auto v = call(wire::MUX_RESET, wire::encode(stack));
  return v.is<std::int64_t>() ? v.as<std::int64_t>() : 0;
}

wire::value client::status() { return call(wire::MUX_STATUS, wire::encode(wire::value(wire::none{}))); }

void client::stop() { call(wire::MUX_STOP, wire::encode(wire::value(wire::none{}))); }

bool client::connected() const { return !detached_ && router_->stream_for(wire::master_id) != nullptr; }

void client::detach() {
  if (detached_) return;
  detached_ = true;
  // The router's shutdown hangs up on the daemon (it does not shut it down).
  broker_->shutdown();
  broker_->join();
}

void client::abandon() {
  if (detached_) return;
  detached_ = true;
  // Our descriptor is a copy of the parent's connection: swap in one whose peer is
  // gone, so nothing written here can reach the daemon as the parent.
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0) {
    ::close(sp[1]);
    ::dup3(sp[0], fd_, O_CLOEXEC);
    ::close(sp[0]);
  }
  std::lock_guard lk(graveyard_mu);
  graveyard().push_back(shared_from_this());
  graveyard().push_back(broker_);
  graveyard().push_back(router_);
}

}  // namespace mitogen::mux
