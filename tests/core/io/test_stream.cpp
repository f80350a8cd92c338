#include "mitogen/io/stream.hpp"  // first: the header compiles on its own

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <condition_variable>
#include <thread>

#include "mitogen/errors.hpp"

using namespace mitogen;
using namespace std::chrono_literals;

namespace {

/// Collects what a stream delivers, for assertions from the test thread.
struct sink {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<wire::message> msgs;
  bool gone = false;
  std::error_code why;

  void attach(stream& s) {
    s.on_message([this](wire::message&& m) {
      std::lock_guard lk(mu);
      msgs.push_back(std::move(m));
      cv.notify_all();
    });
    s.on_disconnect([this](std::error_code ec, const std::string&) {
      std::lock_guard lk(mu);
      gone = true;
      why = ec;
      cv.notify_all();
    });
  }
  bool wait_count(std::size_t n, std::chrono::milliseconds t = 5s) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, t, [&] { return msgs.size() >= n; });
  }
  bool wait_gone(std::chrono::milliseconds t = 5s) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, t, [&] { return gone; });
  }
};

wire::message msg(std::uint32_t handle, std::string data) {
  wire::message m;
  m.dst_id = 0;
  m.src_id = m.auth_id = 7;
  m.handle = handle;
  m.data = std::move(data);
  return m;
}

void write_all(int fd, const std::string& s) {
  std::size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    REQUIRE(n > 0);
    off += static_cast<std::size_t>(n);
  }
}

/// A socketpair: [0] for the stream, [1] for the test playing the peer.
struct pair {
  int fd[2];
  pair() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fd) == 0); }
};

}  // namespace

TEST_CASE("frames arrive whole and in order whatever the chunking", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t"});
  sink k;
  k.attach(*s);
  s->start();
  std::string bytes;
  for (int i = 0; i < 100; ++i) bytes += wire::encode_frame(msg(1000 + i, std::string(i * 37, 'x')));
  for (std::size_t off = 0; off < bytes.size(); off += 13) write_all(p.fd[1], bytes.substr(off, 13));
  REQUIRE(k.wait_count(100));
  for (int i = 0; i < 100; ++i) {
    CHECK(k.msgs[i].handle == static_cast<std::uint32_t>(1000 + i));
    CHECK(k.msgs[i].data.size() == static_cast<std::size_t>(i * 37));
  }
  ::close(p.fd[1]);
  REQUIRE(k.wait_gone());
  CHECK(k.why == errc::child_died);
}

TEST_CASE("a bad magic drops the stream with protocol_error", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t"});
  sink k;
  k.attach(*s);
  s->start();
  write_all(p.fd[1], wire::encode_frame(msg(1000, "ok")));
  write_all(p.fd[1], std::string(26, 'Z'));
  REQUIRE(k.wait_gone());
  CHECK(k.why == errc::protocol_error);
  CHECK(k.msgs.size() == 1);
  CHECK(s->closed());
  CHECK_FALSE(s->send(msg(1, "")));
  // The peer sees the stream close.
  char c;
  CHECK(::read(p.fd[1], &c, 1) == 0);
  ::close(p.fd[1]);
}

TEST_CASE("an oversized length field drops the stream before anything is allocated", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t", .max_message_size = 1024});
  sink k;
  k.attach(*s);
  s->start();
  auto big = msg(1000, std::string(2048, 'a'));
  write_all(p.fd[1], wire::encode_frame(big).substr(0, 26));
  REQUIRE(k.wait_gone());
  CHECK(k.why == errc::protocol_error);
  ::close(p.fd[1]);
}

TEST_CASE("sends from many threads arrive intact", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t"});
  s->start();
  constexpr int threads = 8, per = 500;
  std::atomic<int> received{0};
  // Catch2 assertions are not thread-safe: threads record, the test thread checks.
  std::atomic<bool> in_order{true};
  std::atomic<int> refused{0};
  std::thread reader([&] {
    wire::frame_parser fp;
    std::vector<std::uint8_t> buf(65536);
    std::map<std::uint32_t, int> next;
    bool ordered = true;
    while (received < threads * per) {
      ssize_t n = ::read(p.fd[1], buf.data(), buf.size());
      if (n <= 0) break;
      std::span<const std::uint8_t> in(buf.data(), static_cast<std::size_t>(n));
      wire::message m;
      while (!in.empty() && fp.parse(in, m) == wire::frame_parser::status::good) {
        // Per sender thread, messages keep their order.
        int seq = std::stoi(m.data);
        if (seq != next[m.handle]) ordered = false;
        next[m.handle] = seq + 1;
        received++;
      }
    }
    in_order = ordered;
  });
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < per; ++i)
        if (!s->send(msg(2000 + t, std::to_string(i) + std::string(i % 300, 'p')))) refused++;
    });
  for (auto& t : ts) t.join();
  reader.join();
  CHECK(in_order.load());
  CHECK(refused.load() == 0);
  CHECK(received.load() == threads * per);
  s->close(make_error_code(errc::broker_shut_down), "done");
  ::close(p.fd[1]);
}

TEST_CASE("a full peer applies backpressure, and closing releases the blocked sender", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t", .max_queued_bytes = 256 * 1024});
  s->start();
  std::atomic<int> sent{0};
  std::atomic<bool> refused{false};
  std::thread t([&] {
    for (int i = 0; i < 1000; ++i) {
      if (!s->send(msg(1000, std::string(64 * 1024, 'b')))) {
        refused = true;
        return;
      }
      sent++;
    }
  });
  // The peer reads nothing: once the queue passes the limit the sender blocks.
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (s->queued_bytes() <= 256 * 1024 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  REQUIRE(s->queued_bytes() > 256 * 1024);
  int stalled_at = sent.load();
  CHECK(stalled_at < 1000);
  CHECK(s->queued_bytes() <= 256 * 1024 + 64 * 1024 + 26);
  std::this_thread::sleep_for(100ms);  // and stays blocked (the one wait that is a duration)
  CHECK(sent.load() == stalled_at);
  s->close(make_error_code(errc::broker_shut_down), "test");
  t.join();
  CHECK(refused.load());
  ::close(p.fd[1]);
}

TEST_CASE("the queue drains as the peer reads", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t", .max_queued_bytes = 128 * 1024});
  s->start();
  constexpr int N = 200;
  std::atomic<int> refused{0};  // checked by this thread: Catch2 is not thread-safe
  std::thread t([&] {
    for (int i = 0; i < N; ++i)
      if (!s->send(msg(1000, std::string(32 * 1024, 'c')))) refused++;
  });
  std::size_t total = 0, want = N * (26 + 32 * 1024);
  std::vector<char> buf(1 << 16);
  while (total < want) {
    ssize_t n = ::read(p.fd[1], buf.data(), buf.size());
    REQUIRE(n > 0);
    total += static_cast<std::size_t>(n);
  }
  t.join();
  CHECK(refused.load() == 0);
  CHECK(total == want);
  s->close(make_error_code(errc::broker_shut_down), "done");
  ::close(p.fd[1]);
}

TEST_CASE("a write to a vanished peer closes the stream instead of crashing", "[stream]") {
  auto b = std::make_shared<broker>();
  int in[2], out[2];
  REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  auto s = stream::create(b, in[0], out[1], {.name = "t"});
  sink k;
  k.attach(*s);
  s->start();
  ::close(out[0]);  // nobody reads what we write: EPIPE (the broker ignores SIGPIPE)
  CHECK_FALSE(s->send(msg(1000, "x")));
  REQUIRE(k.wait_gone());
  CHECK(k.why == errc::child_died);
  ::close(in[1]);
}

TEST_CASE("raw phase hands over to framing mid-buffer", "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t"});
  sink k;
  k.attach(*s);
  std::string seen;
  s->start([&](std::string_view d, bool& framed) -> std::size_t {
    auto pos = d.find("GO\n");
    if (pos == std::string_view::npos) return 0;
    seen = std::string(d.substr(0, pos));
    framed = true;
    return pos + 3;
  });
  write_all(p.fd[1], "banner noise GO\n" + wire::encode_frame(msg(1234, "after")));
  REQUIRE(k.wait_count(1));
  CHECK(seen == "banner noise ");
  CHECK(k.msgs[0].handle == 1234);
  CHECK(k.msgs[0].data == "after");
  s->close(make_error_code(errc::broker_shut_down), "done");
  // close() from this thread runs on the broker later; `k` and `seen` must outlive it.
  REQUIRE(k.wait_gone());
  ::close(p.fd[1]);
}

TEST_CASE("nothing is written once close() has returned, even before the broker closes the descriptors",
          "[stream]") {
  auto b = std::make_shared<broker>();
  pair p;
  auto s = stream::create(b, p.fd[0], p.fd[0], {.name = "t"});
  sink k;
  k.attach(*s);
  s->start();
  // Hold the broker thread, so the close that close() defers to it cannot run yet:
  // the descriptor stays open and an inline write would still reach the peer.
  std::mutex mu;
  std::condition_variable cv;
  bool holding = false, release = false;
  REQUIRE(b->defer([&] {
    std::unique_lock lk(mu);
    holding = true;
    cv.notify_all();
    cv.wait(lk, [&] { return release; });
  }));
  {
    std::unique_lock lk(mu);
    REQUIRE(cv.wait_for(lk, 10s, [&] { return holding; }));
  }
  REQUIRE(s->send(msg(1000, "before")));  // inline write: the queue is empty
  s->close(make_error_code(errc::broker_shut_down), "test");
  CHECK(s->closed());
  CHECK_FALSE(s->send(msg(1000, "after")));
  CHECK_FALSE(s->send_raw("raw after"));
  {
    std::lock_guard lk(k.mu);
    CHECK_FALSE(k.gone);  // the broker has not run the close yet
  }
  {
    std::lock_guard lk(mu);
    release = true;
  }
  cv.notify_all();
  REQUIRE(k.wait_gone());
  // The peer got exactly the frame sent before close(), then end of file.
  std::string got;
  std::vector<char> buf(4096);
  for (;;) {
    ssize_t n = ::read(p.fd[1], buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    REQUIRE(n >= 0);
    if (n == 0) break;
    got.append(buf.data(), static_cast<std::size_t>(n));
  }
  CHECK(got == wire::encode_frame(msg(1000, "before")));
  ::close(p.fd[1]);
}
