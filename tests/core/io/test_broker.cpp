#include "mitogen/io/broker.hpp"  // first: the header compiles on its own

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>

using namespace mitogen;

TEST_CASE("defer runs on the broker thread, defer_sync waits for it", "[broker]") {
  auto b = std::make_shared<broker>();
  std::atomic<bool> on_thread{false};
  REQUIRE(b->defer_sync([&] { on_thread = b->on_broker_thread(); }));
  CHECK(on_thread.load());
  CHECK_FALSE(b->on_broker_thread());
}

TEST_CASE("shutdown is idempotent, safe from any thread and from handlers", "[broker]") {
  auto b = std::make_shared<broker>();
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i) ts.emplace_back([b] { b->shutdown(); });
  b->defer([b] { b->shutdown(); });
  for (auto& t : ts) t.join();
  b->join();
  b->join();
  CHECK(b->shutting_down());
  CHECK_FALSE(b->defer([] {}));
  CHECK_FALSE(b->defer_sync([] {}));
}

TEST_CASE("shutdown hooks run and the thread waits for them", "[broker]") {
  auto b = std::make_shared<broker>();
  std::atomic<int> ran{0};
  b->add_shutdown_hook([&](std::function<void()> done) {
    ran++;
    b->defer([&, done] {
      ran++;
      done();
    });
  });
  b->shutdown();
  b->join();
  CHECK(ran.load() == 2);
}

TEST_CASE("destroying the last reference shuts down and joins", "[broker]") {
  std::weak_ptr<broker> w;
  {
    auto b = std::make_shared<broker>();
    w = b;
    b->defer([] {});
  }
  CHECK(w.expired());
}

TEST_CASE("several brokers live in one process", "[broker]") {
  std::vector<std::shared_ptr<broker>> bs;
  for (int i = 0; i < 5; ++i) bs.push_back(std::make_shared<broker>());
  std::atomic<int> n{0};
  for (auto& b : bs) REQUIRE(b->defer_sync([&] { n++; }));
  CHECK(n.load() == 5);
  for (auto& b : bs) b->shutdown();
  for (auto& b : bs) b->join();
}
