// Each scenario starts one well-behaved context and one hostile one on the same
// router, and checks what a user would see: the hostile context's calls fail
// promptly with a clear error (or are refused), the good context keeps working,
// the controller's memory stays bounded, and the misbehaviour is logged once.
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <thread>

#include "mitogen/mitogen.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
using clk = std::chrono::steady_clock;

namespace {

long rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

/// Captures the master's log lines.
struct log_capture {
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(4096);
  log_capture() { spdlog::default_logger()->sinks().push_back(sink); }
  ~log_capture() {
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink), sinks.end());
  }
  int count(const std::string& needle) {
    int n = 0;
    for (auto& l : sink->last_formatted())
      if (l.find(needle) != std::string::npos) ++n;
    return n;
  }
};

struct rig {
  std::shared_ptr<broker> b = std::make_shared<broker>();
  std::shared_ptr<router> r = router::create(b);
  context good = local(*r);
  std::int64_t good_pid = good.call({.module = "os", .function = "getpid"}).as<std::int64_t>();

  context hostile(const std::string& scenario) {
    return local(*r, {{.python_path = {TEST_PYTHON, HOSTILE_CHILD, scenario}, .connect_timeout = 10s}});
  }
  /// The good context still answers (within the call's timeout: a stalled broker or
  /// router would make it throw timeout_error).
  void good_still_works() {
    CHECK(good.call({.module = "os", .function = "getpid"}, 10s).as<std::int64_t>() == good_pid);
  }
  ~rig() {
    b->shutdown();
    b->join();
  }
};

call_spec any_call() { return {.module = "os", .function = "getpid"}; }

}  // namespace

TEST_CASE("garbage before the bootstrap marker is ignored", "[hostile]") {
  rig t;
  auto h = t.hostile("garbage_before");
  auto rx = h.call_async(any_call());
  // This child never answers calls; it is connected, which is the point.
  CHECK_THROWS_AS(rx->get(200ms), timeout_error);
  t.good_still_works();
}

TEST_CASE("garbage after the bootstrap marker drops the stream", "[hostile]") {
  log_capture logs;
  rig t;
  auto h = t.hostile("garbage_after");
  CHECK(t.r->wait_disconnected(h.id(), 5000ms));
  CHECK_THROWS_AS(h.call(any_call(), 5s), channel_error);
  CHECK(logs.count("broke the protocol") == 1);
  t.good_still_works();
}

TEST_CASE("a frame claiming 4 GiB drops the stream without allocating it", "[hostile]") {
  rig t;
  long before = rss_kib();
  auto h = t.hostile("huge_length");
  CHECK(t.r->wait_disconnected(h.id(), 5000ms));
  CHECK(rss_kib() - before < 32 * 1024);
  t.good_still_works();
}

TEST_CASE("a truncated frame then EOF fails the pending call at once", "[hostile]") {
  rig t;
  auto h = t.hostile("truncated");
  // channel_error, not timeout_error: failed by the end of file, not by the clock.
  CHECK_THROWS_AS(h.call(any_call(), 30s), channel_error);
  t.good_still_works();
}

TEST_CASE("replies with forbidden globals or REDUCE tricks are refused", "[hostile]") {
  for (std::string scenario : {"forbidden_global", "reduce_trick", "deep_nesting", "memo_bomb"}) {
    DYNAMIC_SECTION(scenario) {
      log_capture logs;
      rig t;
      auto h = t.hostile(scenario);
      long before = rss_kib();
      try {
        h.call(any_call(), 30s);  // refused at once: a timeout_error would fail below
        FAIL("hostile reply accepted");
      } catch (const stream_error& e) {
        CHECK(e.code() == errc::protocol_error);
      }
      CHECK(rss_kib() - before < 64 * 1024);
      // The rule-breaker is cut off.
      CHECK(t.r->wait_disconnected(h.id(), 5000ms));
      CHECK(logs.count("disconnecting context") == 1);
      t.good_still_works();
    }
  }
}

TEST_CASE("a million-element dict is decoded with memory released afterwards", "[hostile]") {
  rig t;
  auto h = t.hostile("big_dict");
  long before = rss_kib();
  {
    auto v = h.call(any_call(), 30s);
    REQUIRE(v.is<wire::dict>());
    CHECK(v.as<wire::dict>().items.size() == 1000000);
  }
  CHECK(rss_kib() - before < 64 * 1024);
  t.good_still_works();
}

TEST_CASE("spoofed src_id and auth_id are dropped and logged once", "[hostile]") {
  log_capture logs;
  rig t;
  auto h = t.hostile("spoof");
  auto v = h.call(any_call(), 5s);
  CHECK(v.as<wire::str>().utf8 == "honest");
  CHECK(logs.count("claiming src_id") == 1);
  t.good_still_works();
}

TEST_CASE("a child cannot answer calls made to another context", "[hostile]") {
  log_capture logs;
  rig t;
  // Calls to the good context wait on handles >= 1000, which the hostile child
  // sprays with forged replies.
  std::vector<std::shared_ptr<receiver>> pending;
  for (int i = 0; i < 20; ++i)
    pending.push_back(t.good.call_async({.module = "time", .function = "sleep", .args = {{0.3}}}));
  auto h = t.hostile("steal_reply");
  CHECK(h.call(any_call(), 5s).as<wire::str>().utf8 == "honest");
  for (auto& rx : pending) CHECK(t.good.result(rx->get(10s)) == wire::value(wire::none{}));
  CHECK(logs.count("reserved for context") == 1);
}

TEST_CASE("ADD_ROUTE from a child is refused", "[hostile]") {
  rig t;
  auto h = t.hostile("add_route");
  CHECK(h.call(any_call(), 5s).as<wire::str>().utf8 == "honest");
  CHECK(t.r->stream_for(12345) == nullptr);
  t.good_still_works();
}

TEST_CASE("route abuse: hoarding id blocks, claiming or deleting a sibling's route", "[hostile][via]") {
  log_capture logs;
  rig t;
  auto h = t.hostile("route_abuse");
  CHECK(h.call(any_call(), 10s).as<wire::str>().utf8 == "honest");
  CHECK(t.r->routed_via(t.good.id()) == t.good.id());
  CHECK(t.r->descendants_of(h.id()).empty());
  CHECK(logs.count("id blocks; refused") == 1);
  CHECK(logs.count("sent ADD_ROUTE") == 1);
  CHECK(logs.count("sent DEL_ROUTE") == 0);  // logged once per child with ADD_ROUTE's complaint
  t.good_still_works();
}

TEST_CASE("a flood of FORWARD_LOG is rate limited, memory bounded, logged once", "[hostile]") {
  log_capture logs;
  std::atomic<long> delivered{0};  // before the rig: the sink may run during its shutdown
  rig t;
  t.r->set_log_sink([&](std::uint32_t, const std::string&, const std::string&, int, const std::string&) { delivered++; });
  long before = rss_kib();
  auto h = t.hostile("log_flood");
  CHECK(h.call(any_call(), 30s).as<wire::str>().utf8 == "honest");
  // ~2 s of flooding: at most the burst plus the rate for that time gets through.
  CHECK(delivered.load() <= static_cast<long>(router::log_burst + router::log_rate * 4));
  CHECK(logs.count("log records per second") == 1);
  CHECK(rss_kib() - before < 64 * 1024);
  t.good_still_works();
}
