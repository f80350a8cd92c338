// soak: many calls and many context start/stop cycles through one broker; the
// controller's resident memory and open descriptors afterwards must stay near where
// they started. Bounded: stops by itself. Run by .ci/soak, not by ctest.
//
// Usage: soak [calls=200000] [cycles=2000] [threads=4] [rss_bound_mib=20]
//
// Phases (each spread over `threads` user threads, one broker and one router):
//  1. warm-up: one context per thread, a few hundred calls, stopped; then the baseline
//     (first allocations of the broker, spdlog, Python children and the thread stacks
//     are not leaks);
//  2. calls: `calls` calls over one context per thread, mixing no-op calls, 4 KiB echoes,
//     calls that raise (call_error), call_no_reply and pipelined call_async batches;
//  3. cycles: `cycles` times local() + one call + shutdown(wait).
// Exit status 0 if RSS grew by less than the bound and the descriptor count, child
// count and thread count are back to the baseline; 1 otherwise; 2 on a failed call.
#include <dirent.h>
#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "mitogen/mitogen.hpp"

using namespace mitogen;
using clk = std::chrono::steady_clock;

namespace {

struct figures {
  long rss_kib = 0;
  int fds = 0;
  int children = 0;
  int threads = 0;
};

long status_field(const char* name) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key = std::string(name) + ":";
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::strtol(line.c_str() + key.size(), nullptr, 10);
  return -1;
}

int count_fds() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++n;
    closedir(d);
  }
  return n - 1;  // not the descriptor opendir itself holds
}

/// Live children (including zombies not yet reaped), from /proc/<pid>/stat.
int count_children() {
  const pid_t me = getpid();
  int n = 0;
  DIR* d = opendir("/proc");
  if (!d) return -1;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream in(std::string("/proc/") + e->d_name + "/stat");
    std::string s;
    std::getline(in, s);
    auto close_paren = s.rfind(')');
    if (close_paren == std::string::npos) continue;
    std::istringstream rest(s.substr(close_paren + 2));
    char state;
    long ppid = 0;
    rest >> state >> ppid;
    if (ppid == me) ++n;
  }
  closedir(d);
  return n;
}

figures measure() {
  figures f;
  f.rss_kib = status_field("VmRSS");
  f.threads = static_cast<int>(status_field("Threads"));
  f.fds = count_fds();
  f.children = count_children();
  return f;
}

void print(const char* what, const figures& f) {
  std::printf("%-28s RSS %8.1f MiB  fds %4d  children %3d  threads %3d\n", what, f.rss_kib / 1024.0,
              f.fds, f.children, f.threads);
  std::fflush(stdout);
}

double secs(clk::duration d) { return std::chrono::duration<double>(d).count(); }

/// Run fn(thread_index) on `n` threads and wait; any exception fails the soak.
void on_threads(int n, const std::function<void(int)>& fn) {
  std::atomic<bool> failed{false};
  std::vector<std::thread> ts;
  for (int i = 0; i < n; ++i)
    ts.emplace_back([&, i] {
      try {
        fn(i);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "soak: thread %d: %s\n", i, e.what());
        failed = true;
      }
    });
  for (auto& t : ts) t.join();
  if (failed) std::exit(2);
}

/// One thread's share of the calls, on its own context.
void call_mix(router& r, long calls) {
  context c = local(r);
  const std::string four_k(4096, 'z');
  const call_spec noop{.module = "os", .function = "getpid"};
  const call_spec echo{.module = "copy", .function = "copy", .args = {{wire::bytes{four_k}}}};
  const call_spec raises{.module = "builtins", .function = "int", .args = {{wire::str{"not a number"}}}};
  const call_spec quiet{.module = "os", .function = "getpid"};
  long done = 0;
  for (long i = 0; done < calls; ++i) {
    switch (i % 20) {
      case 0: {  // a pipelined batch of 8
        std::vector<std::shared_ptr<receiver>> rs;
        for (int k = 0; k < 8; ++k) rs.push_back(c.call_async(noop));
        for (auto& rc : rs) c.result(rc->get());
        done += 8;
        break;
      }
      case 1:
      case 2:
        if (c.call(echo).as<wire::bytes>().data.size() != four_k.size())
          throw std::runtime_error("echo came back wrong");
        ++done;
        break;
      case 3:
        try {
          c.call(raises);
          throw std::runtime_error("int('not a number') did not raise");
        } catch (const call_error&) {
        }
        ++done;
        break;
      case 4:
        c.call_no_reply(quiet);
        ++done;
        break;
      default:
        c.call(noop);
        ++done;
    }
  }
  c.call(noop);  // every call_no_reply before it has run
  if (!c.shutdown(true)) throw std::runtime_error("context did not stop");
}

void cycles(router& r, long n) {
  const call_spec noop{.module = "os", .function = "getpid"};
  for (long i = 0; i < n; ++i) {
    context c = local(r);
    c.call(noop);
    if (!c.shutdown(true)) throw std::runtime_error("context did not stop");
  }
}

/// Wait (up to `limit`) for teardown that finishes on the broker thread after
/// shutdown(wait) returned: children are reaped by polling, stderr pipes close last.
figures settle(const figures& base, std::chrono::seconds limit) {
  auto until = clk::now() + limit;
  figures f = measure();
  while ((f.fds != base.fds || f.children != base.children || f.threads != base.threads) &&
         clk::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    f = measure();
  }
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  const long calls = argc > 1 ? std::atol(argv[1]) : 200000;
  const long n_cycles = argc > 2 ? std::atol(argv[2]) : 2000;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 4;
  const double bound_mib = argc > 4 ? std::atof(argv[4]) : 20.0;
  if (calls < 0 || n_cycles < 0 || threads < 1) {
    std::fprintf(stderr, "usage: soak [calls] [cycles] [threads] [rss_bound_mib]\n");
    return 2;
  }
  spdlog::set_level(spdlog::level::warn);  // keep the figures readable

  figures start = measure();
  print("start", start);
  auto b = std::make_shared<broker>();
  auto r = router::create(b);

  auto t0 = clk::now();
  on_threads(threads, [&](int) { call_mix(*r, 200); });
  on_threads(threads, [&](int) { cycles(*r, 2); });
  figures base = settle(start, std::chrono::seconds(5));
  print("baseline (after warm-up)", base);

  auto t1 = clk::now();
  on_threads(threads, [&](int i) { call_mix(*r, calls / threads + (i < calls % threads ? 1 : 0)); });
  auto t2 = clk::now();
  figures after_calls = settle(base, std::chrono::seconds(5));
  print("after calls", after_calls);
  std::printf("  %ld calls on %d contexts in %.1f s (%.0f calls/s)\n", calls, threads, secs(t2 - t1),
              calls / secs(t2 - t1));

  auto t3 = clk::now();
  on_threads(threads, [&](int i) { cycles(*r, n_cycles / threads + (i < n_cycles % threads ? 1 : 0)); });
  auto t4 = clk::now();
  figures end = settle(base, std::chrono::seconds(10));
  print("after start/stop cycles", end);
  std::printf("  %ld start/call/stop cycles, %d at a time, in %.1f s (%.1f ms each per thread)\n", n_cycles,
              threads, secs(t4 - t3), n_cycles ? 1000.0 * secs(t4 - t3) * threads / n_cycles : 0.0);

  malloc_trim(0);
  figures trimmed = measure();
  print("after malloc_trim (info)", trimmed);

  const double growth = (end.rss_kib - base.rss_kib) / 1024.0;
  const bool ok = growth < bound_mib && end.fds == base.fds && end.children == base.children &&
                  end.threads == base.threads;
  std::printf("RSS growth %.1f MiB (bound %.0f), fds %d -> %d, children %d -> %d, threads %d -> %d: %s\n",
              growth, bound_mib, base.fds, end.fds, base.children, end.children, base.threads,
              end.threads, ok ? "OK" : "FAIL");
  std::printf("total %.1f s\n", secs(clk::now() - t0));
  b->shutdown();
  b->join();
  return ok ? 0 : 1;
}
