// Leader/follower: a caller waiting for a reply reads the child's stream itself
// (stream_options::leader_reads, router::lead_for), and hands every other frame to
// the broker in order. docs/architecture.md, "A caller reads its reply".
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <future>
#include <thread>

#include "fake_child.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/wire/frame.hpp"

using namespace mitogen;
using namespace std::chrono_literals;

namespace {

using mitogen::test::rig;

/// Holds the broker thread inside a handler until released: whatever reaches a
/// caller meanwhile was read by the caller itself.
struct broker_block {
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  explicit broker_block(broker& b) {
    auto rel = released;
    b.defer([this, rel] {
      entered.set_value();
      rel.wait();
    });
    entered.get_future().wait();
  }
  void open() { release.set_value(); }
};

/// Sends a call to the child; `lead_first`: as context::call does, the caller takes
/// the stream before the request goes out (receiver::lead_first).
std::shared_ptr<receiver> ask(rig& t, bool lead_first = false) {
  auto rx = t.r->make_receiver(t.id, false);
  if (lead_first) rx->lead_first();
  wire::message m;
  m.dst_id = t.id;
  m.handle = wire::CALL_FUNCTION;
  m.reply_to = rx->handle();
  t.r->route(m);
  return rx;
}

/// The child sends `data` to our `handle` (a frame no call waits for).
void child_sends(rig& t, std::uint32_t handle, std::string data) {
  wire::message a;
  a.dst_id = 0;
  a.src_id = a.auth_id = t.id;
  a.handle = handle;
  a.data = std::move(data);
  t.child.send(a);
}

/// True if a frame nobody leads for (to a persistent receiver: never read by a
/// caller) reaches its receiver: the broker watches the stream.
bool broker_reads(rig& t) {
  auto other = t.r->make_receiver(t.id, true);
  child_sends(t, other->handle(), "for the broker");
  auto m = other->get_for(10s);
  return m && m->data == "for the broker";
}

/// Sends a frame to a handler that runs on the broker thread, with no thread waiting
/// on a receiver for it (no follower: only the broker's own watch can read it), and
/// returns when it arrived, if within 10 s.
std::optional<std::chrono::steady_clock::time_point> broker_handles(rig& t) {
  auto arrived = std::make_shared<std::promise<std::chrono::steady_clock::time_point>>();
  auto h = t.r->add_handler([arrived, once = std::make_shared<std::atomic<bool>>()](wire::message&&) {
    if (!once->exchange(true)) arrived->set_value(std::chrono::steady_clock::now());  // not the dead one
  });
  child_sends(t, h, "for a handler");
  auto f = arrived->get_future();
  if (f.wait_for(10s) != std::future_status::ready) {
    t.r->del_handler(h);
    return std::nullopt;
  }
  return f.get();
}

/// One call as context::call makes it (leading first), answered by the child; the
/// caller reads the reply itself, and steps down.
void call_once(rig& t, const std::string& data = "reply") {
  auto rx = ask(t, /*lead_first=*/true);
  t.child.send(t.reply_to(t.child.recv(), data));
  REQUIRE(rx->get(10s).data == data);
}

}  // namespace

TEST_CASE("a caller reads its own reply while the broker thread is busy", "[router][leader]") {
  rig t(true);
  auto rx = ask(t);
  auto req = t.child.recv();
  broker_block block(*t.b);
  t.child.send(t.reply_to(req, "mine"));
  auto m = rx->get(10s);  // the broker cannot deliver it: only the caller can
  block.open();
  CHECK_FALSE(m.is_dead());
  CHECK(m.data == "mine");
  // The broker watches the stream again once the caller is done.
  auto rx2 = ask(t);
  t.child.send(t.reply_to(t.child.recv(), "second"));
  CHECK(rx2->get(10s).data == "second");
}

TEST_CASE("frames before the reply reach their handlers first, on the broker", "[router][leader]") {
  rig t(true);
  auto other = t.r->make_receiver(t.id, /*persist=*/true);
  auto rx = ask(t);
  auto req = t.child.recv();
  std::thread::id delivered_on;
  auto h = t.r->add_handler([&](wire::message&&) { delivered_on = std::this_thread::get_id(); }, {.persist = true});
  {
    broker_block block(*t.b);
    // One write: a frame for another handler, then another, then the reply.
    wire::message a;
    a.dst_id = 0;
    a.src_id = a.auth_id = t.id;
    a.handle = other->handle();
    a.data = "first";
    wire::message b = a;
    b.handle = h;
    auto bytes = wire::encode_frame(a) + wire::encode_frame(b) + wire::encode_frame(t.reply_to(req, "reply"));
    REQUIRE(::write(t.child.fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
    auto got = std::async(std::launch::async, [&] { return rx->get(10s); });
    // While the broker is held, the reply cannot overtake the frames before it.
    CHECK(got.wait_for(300ms) == std::future_status::timeout);
    block.open();
    auto m = got.get();
    CHECK(m.data == "reply");
    // By the time the caller has its reply, the frames before it were handled.
    auto first = other->try_get();
    REQUIRE(first);
    CHECK(first->data == "first");
    CHECK(delivered_on != std::thread::id());
  }
  t.r->del_handler(h);
}

TEST_CASE("a caller's timeout while it reads leaves the stream working", "[router][leader]") {
  rig t(true);
  auto rx = ask(t);
  auto req = t.child.recv();
  auto t0 = std::chrono::steady_clock::now();
  CHECK_FALSE(rx->get_for(200ms));
  CHECK(std::chrono::steady_clock::now() - t0 >= 200ms);
  CHECK_THROWS_AS(rx->get(100ms), timeout_error);
  // A frame nobody waits for is read by the broker again.
  CHECK(broker_reads(t));
  t.child.send(t.reply_to(req, "late"));
  CHECK(rx->get(10s).data == "late");
}

TEST_CASE("a caller that leads first reads a reply sent before it waits", "[router][leader]") {
  // receiver::lead_first(): the stream leaves the broker's sight before the request
  // goes out, so a reply quicker than the caller's next step is not the broker's.
  rig t(true);
  auto rx = ask(t, /*lead_first=*/true);
  t.child.send(t.reply_to(t.child.recv(), "quick"));
  // The broker is idle and would have read and delivered it by now; it does not
  // watch the stream, so the reply waits in the socket for the caller.
  std::this_thread::sleep_for(300ms);
  CHECK(rx->size() == 0);
  CHECK(rx->get(10s).data == "quick");
  // Stepped down: a frame nobody waits for reaches the broker again.
  CHECK(broker_reads(t));
}

TEST_CASE("a caller that leads first and waits for its output to drain lets the broker read", "[router][leader]") {
  // Its request is over the stream's output limit: the send waits for the child to
  // read. A child that is itself writing (output, a log) would never read if nobody
  // read it: the waiting sender steps down, and the broker reads meanwhile.
  rig t(true, 64 * 1024);
  t.b->set_park_limit(std::chrono::hours(1));
  auto rx = t.r->make_receiver(t.id, false);
  auto caller = std::async(std::launch::async, [&] {
    rx->lead_first();
    wire::message m;
    m.dst_id = t.id;
    m.handle = wire::CALL_FUNCTION;
    m.reply_to = rx->handle();
    m.data.assign(4 * 1024 * 1024, 'x');
    t.r->route(std::move(m));  // waits until the child has read most of it
    return rx->get(30s);
  });
  // The request is queued beyond the limit: the caller waits in route().
  auto until = std::chrono::steady_clock::now() + 10s;
  while (t.s->queued_bytes() <= 64 * 1024 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  REQUIRE(t.s->queued_bytes() > 64 * 1024);
  // Not parked either (the limit is an hour): the broker's own handlers are served
  // while the sender waits, and so is a thread waiting on a receiver.
  CHECK(broker_handles(t));
  CHECK(broker_reads(t));
  auto req = t.child.recv();  // drains the request
  CHECK(req.data.size() == 4 * 1024 * 1024);
  t.child.send(t.reply_to(req, "done"));
  CHECK(caller.get().data == "done");
}

TEST_CASE("a receiver dropped after leading first gives the stream back to the broker", "[router][leader]") {
  rig t(true);
  {
    auto rx = t.r->make_receiver(t.id, false);
    rx->lead_first();
  }  // never waited on
  CHECK(broker_reads(t));
  // And a later caller can lead again.
  auto rx = ask(t);
  t.child.send(t.reply_to(t.child.recv(), "again"));
  CHECK(rx->get(10s).data == "again");
}

TEST_CASE("a child closing its end releases the caller reading it", "[router][leader]") {
  rig t(true);
  auto rx = ask(t);
  t.child.recv();
  auto got = std::async(std::launch::async, [&] { return rx->get(30s); });
  CHECK(got.wait_for(100ms) == std::future_status::timeout);
  auto t0 = std::chrono::steady_clock::now();
  ::close(t.child.fd);
  t.child.fd = -1;
  auto m = got.get();
  CHECK(m.is_dead());
  CHECK(std::chrono::steady_clock::now() - t0 < 15s);  // released by the close, not a timeout
}

TEST_CASE("a bad frame read by a caller closes the stream and releases it", "[router][leader]") {
  rig t(true);
  auto rx = ask(t);
  t.child.recv();
  auto got = std::async(std::launch::async, [&] { return rx->get(30s); });
  CHECK(got.wait_for(100ms) == std::future_status::timeout);
  std::string junk(64, 'x');
  REQUIRE(::write(t.child.fd, junk.data(), junk.size()) == 64);
  auto m = got.get();
  CHECK(m.is_dead());
  CHECK(t.s->closed());
}

TEST_CASE("broker shutdown releases a caller reading its reply", "[router][leader]") {
  rig t(true);
  auto rx = ask(t);
  t.child.recv();
  auto got = std::async(std::launch::async, [&] { return rx->get(30s); });
  CHECK(got.wait_for(100ms) == std::future_status::timeout);
  t.b->shutdown();
  CHECK(got.get().is_dead());
}

TEST_CASE("many threads calling at once each get their own reply", "[router][leader]") {
  rig t(true);
  // Callers step down, park the stream, and others follow: none may be left waiting
  // for the park limit.
  t.b->set_park_limit(std::chrono::hours(1));
  constexpr int threads = 6, calls = 300;
  // The child answers every request with its reply handle as the payload; replies
  // for different callers arrive interleaved on the one stream.
  std::thread child([&] {
    for (int n = 0; n < threads * calls; ++n) {
      auto req = t.child.recv();
      t.child.send(t.reply_to(req, std::to_string(req.reply_to)));
    }
  });
  std::atomic<int> wrong{0}, ok{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < threads; ++i)
    callers.emplace_back([&] {
      for (int c = 0; c < calls; ++c) {
        auto rx = ask(t);
        auto m = rx->get(30s);
        (m.data == std::to_string(rx->handle()) ? ok : wrong)++;
      }
    });
  for (auto& th : callers) th.join();
  child.join();
  CHECK(wrong == 0);
  CHECK(ok == threads * calls);
}

TEST_CASE("output queued on a shared-socket leader stream is flushed once the child reads", "[router][leader]") {
  // The broker waits for writability through a second epoll set (the socket's own
  // input must not wake it): a message far bigger than the socket buffer goes out
  // in pieces as the child reads.
  rig t(true);
  wire::message big;
  big.dst_id = t.id;
  big.handle = 4242;
  big.data.assign(8u << 20, 'z');
  for (std::size_t i = 0; i < big.data.size(); i += 4096) big.data[i] = static_cast<char>('a' + i / 4096 % 26);
  t.r->route(big);  // queued: the child is not reading yet
  auto got = t.child.recv();
  CHECK(got.handle == 4242);
  CHECK(got.data == big.data);
}

TEST_CASE("two threads waiting on one receiver: one reads, both are served", "[router][leader]") {
  // One leads, the other waits on the condition variable; closing the receiver
  // from a third thread must wake the one reading as well.
  rig t(true);
  auto once = ask(t);
  t.child.recv();
  auto a = std::async(std::launch::async, [&] { return once->get(30s); });
  auto b = std::async(std::launch::async, [&] { return once->get(30s); });
  CHECK(a.wait_for(100ms) == std::future_status::timeout);
  once->close("closed by the test");
  CHECK(a.get().is_dead());
  CHECK(b.get().is_dead());
}

TEST_CASE("after router::shutdown() returns, a call is refused, not sent", "[router][leader]") {
  // The children are told and the waiters released on the broker thread (held
  // here), but new work is refused at once: otherwise a caller reading its own
  // reply could still get one from a child that has not heard of the shutdown.
  rig t(true);
  broker_block block(*t.b);
  t.r->shutdown();
  CHECK(t.r->is_shut_down());
  auto rx = ask(t);
  char byte;
  CHECK(::recv(t.child.fd, &byte, 1, MSG_DONTWAIT) == -1);  // route() sent nothing
  CHECK(errno == EAGAIN);
  block.open();
  auto m = rx->get(10s);
  CHECK(m.is_dead());
  CHECK(m.data.find("shut down") != std::string::npos);
}

// ------------------------------------------------------------------ parking
// A caller stepping down leaves the stream out of the broker's sight ("parked"), so
// that the next call needs no epoll_ctl() to take it again; the broker watches it
// again within its park limit, or at once when a thread starts waiting for what
// only the broker reads. docs/architecture.md, "Parking".

TEST_CASE("a stream a caller stepped down from is watched again within the park limit", "[router][leader][park]") {
  rig t(true);
  t.b->set_park_limit(300ms);
  const auto t0 = std::chrono::steady_clock::now();
  call_once(t);
  // A frame only the broker reads (a log record, output) waits for the limit...
  auto at = broker_handles(t);
  REQUIRE(at);
  CHECK(*at - t0 >= 300ms);
  // ... and the stream is the broker's again: the next one is not held back.
  t.b->set_park_limit(std::chrono::hours(1));
  CHECK(broker_handles(t));
  // A later call parks it again, and a thread waiting on a receiver takes it back.
  call_once(t, "again");
  CHECK(broker_reads(t));
}

TEST_CASE("a thread starting to wait for the broker unparks the stream at once", "[router][leader][park]") {
  rig t(true);
  t.b->set_park_limit(std::chrono::hours(1));
  SECTION("the frame is already waiting") {
    call_once(t);
    CHECK(broker_reads(t));
  }
  SECTION("the frame comes while the thread waits") {
    call_once(t);
    auto other = t.r->make_receiver(t.id, true);
    auto got = std::async(std::launch::async, [&] { return other->get_for(10s); });
    CHECK(got.wait_for(100ms) == std::future_status::timeout);
    child_sends(t, other->handle(), "later");
    auto m = got.get();
    REQUIRE(m);
    CHECK(m->data == "later");
  }
  SECTION("the thread waits while others call in a loop") {
    // It follows the whole time: no step-down parks the stream meanwhile.
    auto other = t.r->make_receiver(t.id, true);
    auto got = std::async(std::launch::async, [&] { return other->get_for(20s); });
    CHECK(got.wait_for(100ms) == std::future_status::timeout);
    for (int i = 0; i < 50; ++i) call_once(t, std::to_string(i));
    CHECK(broker_handles(t));
    child_sends(t, other->handle(), "after the calls");
    auto m = got.get();
    REQUIRE(m);
    CHECK(m->data == "after the calls");
  }
}

TEST_CASE("a receiver watched by a select is not held back by parking", "[router][leader][park]") {
  rig t(true);
  t.b->set_park_limit(std::chrono::hours(1));
  call_once(t);
  auto other = t.r->make_receiver(t.id, true);
  std::promise<void> notified;
  std::atomic<bool> once{false};
  other->set_notify([&] {
    if (!once.exchange(true)) notified.set_value();
  });
  child_sends(t, other->handle(), "selected");
  CHECK(notified.get_future().wait_for(10s) == std::future_status::ready);
  other->set_notify(nullptr);
  // No longer watched: a call parks the stream again.
  t.b->set_park_limit(200ms);
  const auto t0 = std::chrono::steady_clock::now();
  call_once(t, "parks again");
  auto at = broker_handles(t);
  REQUIRE(at);
  CHECK(*at - t0 >= 200ms);
}
