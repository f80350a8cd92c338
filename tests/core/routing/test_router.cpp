#include "mitogen/routing/router.hpp"  // first: the header compiles on its own

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>

#include "mitogen/errors.hpp"
#include "mitogen/wire/frame.hpp"
#include "fake_child.hpp"

using namespace mitogen;
using namespace std::chrono_literals;

namespace {

using mitogen::test::fake_child;
using mitogen::test::rig;

wire::message request(std::uint32_t dst, std::uint32_t handle, std::string data = {}) {
  wire::message m;
  m.dst_id = dst;
  m.handle = handle;
  m.data = std::move(data);
  return m;
}

}  // namespace

TEST_CASE("a reply reaches the receiver that asked", "[router]") {
  rig t;
  auto rx = t.r->make_receiver(t.id, false);
  auto m = request(t.id, 101, "hello");
  m.reply_to = rx->handle();
  t.r->route(m);
  auto got = t.child.recv();
  CHECK(got.handle == 101);
  CHECK(got.src_id == 0);
  CHECK(got.data == "hello");
  t.child.send(t.reply_to(got, "world"));
  auto rep = rx->get(5s);
  CHECK_FALSE(rep.is_dead());
  CHECK(rep.data == "world");
}

TEST_CASE("a child disconnecting releases every waiting caller at once", "[router]") {
  rig t;
  std::vector<std::shared_ptr<receiver>> rxs;
  for (int i = 0; i < 50; ++i) {
    auto rx = t.r->make_receiver(t.id, false);
    auto m = request(t.id, 101);
    m.reply_to = rx->handle();
    t.r->route(m);
    rxs.push_back(rx);
  }
  for (int i = 0; i < 50; ++i) t.child.recv();
  auto t0 = std::chrono::steady_clock::now();
  ::close(t.child.fd);
  t.child.fd = -1;
  for (auto& rx : rxs) {
    auto m = rx->get(30s);
    CHECK(m.is_dead());
    CHECK(m.data.find("disconnected") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - t0 < 15s);  // released by the close, not a timeout
  // Later sends fail at once with a dead reply instead of hanging.
  auto rx = t.r->make_receiver(t.id, false);
  auto m = request(t.id, 101);
  m.reply_to = rx->handle();
  t.r->route(m);
  CHECK(rx->get(1s).is_dead());
}

TEST_CASE("a spoofed src_id or auth_id is dropped", "[router]") {
  rig t;
  auto rx = t.r->make_receiver(std::nullopt, true);
  auto spoof = request(0, rx->handle(), "spoof");
  spoof.src_id = t.id + 5;
  spoof.auth_id = t.id + 5;
  t.child.send(spoof);
  auto spoof2 = request(0, rx->handle(), "spoof2");
  spoof2.src_id = t.id;
  spoof2.auth_id = 0;  // claims the master's authority
  t.child.send(spoof2);
  auto good = request(0, rx->handle(), "good");
  good.src_id = good.auth_id = t.id;
  t.child.send(good);
  auto m = rx->get(5s);
  CHECK(m.data == "good");
  CHECK_FALSE(rx->try_get().has_value());
}

TEST_CASE("a reply handle only accepts its respondent", "[router]") {
  rig t;
  auto rx = t.r->make_receiver(/*respondent=*/t.id + 1, false);  // waiting on someone else
  auto m = request(0, rx->handle(), "forged reply");
  m.src_id = m.auth_id = t.id;
  t.child.send(m);
  // Round trip something else to be sure the forged one was processed.
  auto probe = t.r->make_receiver(t.id, false);
  auto pm = request(0, probe->handle(), "probe");
  pm.src_id = pm.auth_id = t.id;
  t.child.send(pm);
  CHECK(probe->get(5s).data == "probe");
  CHECK_FALSE(rx->try_get().has_value());
}

TEST_CASE("a message to an unknown handle gets a dead reply", "[router]") {
  rig t;
  auto m = request(0, 4242, "anyone?");
  m.src_id = m.auth_id = t.id;
  m.reply_to = 1234;
  t.child.send(m);
  auto d = t.child.recv();
  CHECK(d.is_dead());
  CHECK(d.handle == 1234);
  CHECK(d.dst_id == t.id);
}

TEST_CASE("forwarded log records reach the sink", "[router]") {
  // Declared before the rig: the sink may still run while the rig shuts down.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::tuple<std::string, int, std::string>> got;
  rig t;
  t.r->set_log_sink([&](std::uint32_t, const std::string&, const std::string& logger, int level, const std::string& text) {
    std::lock_guard lk(mu);
    got.emplace_back(logger, level, text);
    cv.notify_all();
  });
  auto m = request(0, wire::FORWARD_LOG, std::string("stdout\0") + "20" + '\0' + "hello");
  m.data = std::string("stdout") + '\0' + "20" + '\0' + "hello";
  m.src_id = m.auth_id = t.id;
  t.child.send(m);
  std::unique_lock lk(mu);
  REQUIRE(cv.wait_for(lk, 5s, [&] { return !got.empty(); }));
  CHECK(std::get<0>(got[0]) == "stdout");
  CHECK(std::get<1>(got[0]) == 20);
  CHECK(std::get<2>(got[0]) == "hello");
}

TEST_CASE("broker shutdown releases callers and sends SHUTDOWN", "[router]") {
  rig t;
  auto rx = t.r->make_receiver(t.id, false);
  auto m = request(t.id, 101);
  m.reply_to = rx->handle();
  t.r->route(m);
  t.child.recv();
  std::atomic<bool> released_dead{false};  // checked below: Catch2 is not thread-safe
  std::thread waiter([&] { released_dead = rx->get(5s).is_dead(); });
  t.b->shutdown();
  auto sd = t.child.recv();
  CHECK(sd.handle == wire::SHUTDOWN);
  waiter.join();
  CHECK(released_dead.load());
  t.b->join();
  // A receiver created afterwards is dead at once.
  auto late = t.r->make_receiver(std::nullopt, false);
  CHECK(late->get(1s).is_dead());
}

// ---- channels: handler policies, explicit handles, receiver close/size/notify

TEST_CASE("a handler's policy drops what it refuses and answers a dead reply", "[router][channels]") {
  rig t;
  std::atomic<int> asked{0};
  handler_options o;
  o.policy = [&](const wire::message& m) {
    ++asked;
    return m.data == "allowed";
  };
  auto rx = t.r->make_receiver(std::move(o));
  auto m = request(0, rx->handle(), "forged");
  m.src_id = m.auth_id = t.id;
  m.reply_to = 4242;
  t.child.send(m);
  auto dead = t.child.recv();
  CHECK(dead.is_dead());
  CHECK(dead.handle == 4242);
  CHECK(dead.data.find("refused by the policy") != std::string::npos);
  m.data = "allowed";
  m.reply_to = 0;
  t.child.send(m);
  auto got = rx->get(5s);
  CHECK(got.data == "allowed");
  CHECK(asked.load() == 2);
  CHECK(rx->size() == 0);
}

TEST_CASE("an explicit handle that is taken is refused unless overwrite", "[router][channels]") {
  rig t;
  auto rx = t.r->make_receiver(std::nullopt, true);
  handler_options o;
  o.handle = rx->handle();
  o.overwrite = false;
  CHECK_THROWS_AS(t.r->make_receiver(o), mitogen::error);
  // The refused attempt did not remove the first receiver's handler.
  t.r->route(request(0, rx->handle(), "still mine"));
  CHECK(rx->get(5s).data == "still mine");
}

TEST_CASE("receiver get_for: nothing when the time passes, else the message or the dead one", "[router][channels]") {
  rig t;
  auto rx = t.r->make_receiver(std::nullopt, true);
  CHECK_FALSE(rx->get_for(10ms).has_value());  // no exception: an expected outcome
  CHECK_THROWS_AS(rx->get(10ms), timeout_error);
  t.r->route(request(0, rx->handle(), "queued"));
  auto m = rx->get_for(5s);
  REQUIRE(m.has_value());
  CHECK(m->data == "queued");
  rx->close("closed here");
  for (int i = 0; i < 2; ++i) {  // the dead message ends the channel, answered again
    auto d = rx->get_for(0ms);
    REQUIRE(d.has_value());
    CHECK(d->is_dead());
    CHECK(d->data == "closed here");
  }
}

TEST_CASE("receiver close wakes a blocked get, notify counts pushes", "[router][channels]") {
  rig t;
  auto rx = t.r->make_receiver(std::nullopt, true);
  t.r->route(request(0, rx->handle(), "queued"));
  while (rx->size() == 0) std::this_thread::sleep_for(1ms);
  std::atomic<int> notified{0};
  CHECK(rx->set_notify([&] { ++notified; }) == 1);
  t.r->route(request(0, rx->handle(), "second"));
  CHECK(rx->get(5s).data == "queued");
  CHECK(rx->get(5s).data == "second");
  CHECK(notified.load() == 1);
  std::thread closer([&] {
    std::this_thread::sleep_for(100ms);
    rx->close("closed here");
  });
  auto t0 = std::chrono::steady_clock::now();
  auto m = rx->get(30s);
  closer.join();
  CHECK(m.is_dead());
  CHECK(m.data == "closed here");
  CHECK(std::chrono::steady_clock::now() - t0 < 15s);  // woken by close(), not the timeout
  CHECK(notified.load() == 2);
  CHECK(rx->size() == 1);            // the dead message, answered again
  CHECK(rx->get(1s).data == "closed here");
  // The handle is gone: later messages find no handler.
  t.r->route(request(0, rx->handle(), "late"));
  std::this_thread::sleep_for(50ms);
  CHECK(rx->get(1s).is_dead());
}
