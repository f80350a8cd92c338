// Broker lifetime edge cases found by the sanitizer builds (docs/fuzzing.md).
#include <catch2/catch.hpp>

#include <atomic>
#include <functional>
#include <chrono>
#include <memory>
#include <thread>

#include "mitogen/io/broker.hpp"

using namespace mitogen;
using namespace std::chrono_literals;

namespace {

bool eventually(const std::function<bool()>& pred) {
  for (int i = 0; i < 3000; ++i) {  // up to 30 s: a bound for a hang, not a speed
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

}  // namespace

// ASan found this: a stream closing in a handler held the last reference, and the
// broker's destructor freed the io_context while io_context::run() was still on the
// broker thread's stack (heap-use-after-free in scheduler::work_cleanup).
TEST_CASE("the last reference dropped inside a handler on the broker thread", "[broker]") {
  std::weak_ptr<broker> w;
  std::atomic<bool> ran{false};
  {
    auto b = std::make_shared<broker>();
    w = b;
    broker* raw = b.get();
    REQUIRE(raw->defer([b = std::move(b), &ran]() mutable {
      ran = true;
      b.reset();
    }));
  }
  CHECK(eventually([&] { return w.expired(); }));
  CHECK(ran.load());
}

// TSan found this: the broker thread signalled the constructor's condition variable
// after releasing its mutex, so the constructor could return and destroy the
// condition variable while the thread was still inside notify_one().
TEST_CASE("brokers created and destroyed in a tight loop", "[broker]") {
  for (int i = 0; i < 200; ++i) {
    auto b = std::make_shared<broker>();
    CHECK(b->defer_sync([] {}));
  }
}
