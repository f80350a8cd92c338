// bench_core: latency and start-up figures of the C++ API on local contexts, and
// the no-op call against the machine's floor (tests/bench/pingpong.py, run in the
// same invocation): unpinned against two processes on different CPUs, and with
// everything pinned to one CPU against the same ping-pong on one CPU.
// Usage: bench_core [iterations]   (prints a table; see docs/benchmarks.md)
#include <malloc.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "mitogen/mitogen.hpp"

using namespace mitogen;
using clk = std::chrono::steady_clock;

namespace {

double us(clk::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

struct stats {
  double median, p99, min;
};

stats summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v[std::min(v.size() - 1, v.size() * 99 / 100)], v.front()};
}

/// No-op call latency on a fresh broker and context.
stats noop_latency(int iters) {
  auto b = std::make_shared<broker>();
  auto r = router::create(b);
  context c = local(*r);
  call_spec noop{.module = "os", .function = "getpid"};
  for (int i = 0; i < 2000; ++i) c.call(noop);  // warm up
  std::vector<double> lat;
  lat.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    auto t0 = clk::now();
    c.call(noop);
    lat.push_back(us(clk::now() - t0));
  }
  b->shutdown();
  b->join();
  return summarize(std::move(lat));
}

/// The same with every thread and process on CPU 0: a pinned thread creates the
/// broker (its thread inherits the mask) and spawns the child (so does it).
stats noop_latency_one_cpu(int iters) {
  stats out{};
  std::thread t([&] {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    sched_setaffinity(0, sizeof set, &set);
    out = noop_latency(iters);
  });
  t.join();
  return out;
}

/// Median of tests/bench/pingpong.py --cpus `cpus` (microseconds); < 0 if it fails.
double pingpong(const char* cpus) {
  std::string cmd = std::string("/usr/bin/python3 ") + MITOGEN_BENCH_DIR "/pingpong.py --json --cpus " + cpus;
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) return -1;
  char buf[256] = {};
  std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  ::pclose(f);
  std::string out(buf, n);
  auto k = out.find("\"median_us\": ");
  return k == std::string::npos ? -1 : std::atof(out.c_str() + k + 13);
}

}  // namespace

int main(int argc, char** argv) {
  int iters = argc > 1 ? std::atoi(argv[1]) : 20000;
  // The same allocator tuning the Python package applies at import (see
  // docs/benchmarks.md): large buffers are reused instead of being mapped and
  // faulted in afresh for every message.
  if (!std::getenv("MITOGEN_NO_MALLOC_TUNING")) {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
  }
  auto b = std::make_shared<broker>();
  auto r = router::create(b);

  // Bootstrap to first call, sequential contexts.
  std::vector<double> boot;
  for (int i = 0; i < 10; ++i) {
    auto t0 = clk::now();
    context c = local(*r);
    c.call({.module = "os", .function = "getpid"});
    boot.push_back(us(clk::now() - t0));
    c.shutdown(true);
  }
  auto bs = summarize(boot);

  auto ls = noop_latency(iters);
  auto ls1 = noop_latency_one_cpu(iters);
  double pp = pingpong("0,1"), pp1 = pingpong("0,0");

  context c = local(*r);
  call_spec noop{.module = "os", .function = "getpid"};

  std::string mib(1 << 20, 'x');
  for (std::size_t i = 0; i < mib.size(); ++i) mib[i] = static_cast<char>((i * 7919) >> 3);
  call_spec echo{.module = "copy", .function = "copy", .args = {{wire::bytes{mib}}}};
  for (int i = 0; i < 20; ++i) c.call(echo);
  std::vector<double> el;
  for (int i = 0; i < 200; ++i) {
    auto t0 = clk::now();
    auto v = c.call(echo);
    el.push_back(us(clk::now() - t0));
    if (v.as<wire::bytes>().data.size() != mib.size()) return 2;
  }
  auto es = summarize(el);

  // Ten contexts started at once, from ten threads.
  std::vector<double> par;
  for (int round = 0; round < 5; ++round) {
    auto t0 = clk::now();
    std::vector<std::thread> ts;
    std::vector<context> cs(10, c);
    for (int i = 0; i < 10; ++i)
      ts.emplace_back([&, i] {
        cs[i] = local(*r);
        cs[i].call(noop);
      });
    for (auto& t : ts) t.join();
    par.push_back(us(clk::now() - t0));
    for (auto& x : cs) x.shutdown(true);
  }
  auto ps = summarize(par);

  std::printf("%-36s %12s %12s %12s\n", "measure", "median", "p99", "min");
  std::printf("%-36s %10.1fus %10.1fus %10.1fus\n", "no-op call round trip", ls.median, ls.p99, ls.min);
  std::printf("%-36s %10.1fus %10.1fus %10.1fus\n", "1 MiB bytes echo round trip", es.median, es.p99, es.min);
  std::printf("%-36s %10.1fms %10.1fms %10.1fms\n", "bootstrap to first call", bs.median / 1000, bs.p99 / 1000,
              bs.min / 1000);
  std::printf("%-36s %10.1fms %10.1fms %10.1fms\n", "10 contexts started at once", ps.median / 1000,
              ps.p99 / 1000, ps.min / 1000);
  std::printf("%-36s %10.1fus %10.1fus %10.1fus\n", "no-op call, all on CPU 0", ls1.median, ls1.p99, ls1.min);
  std::printf("%-36s %10.1fus\n", "pipe ping-pong, CPUs 0,1 (floor)", pp);
  std::printf("%-36s %10.1fus\n", "pipe ping-pong, CPU 0 only", pp1);
  std::printf("%-36s %10.2fx   (target <= 1.3x)\n", "no-op / ping-pong", ls.median / pp);
  std::printf("%-36s %10.2fx   (target <= 2.5x)\n", "no-op / ping-pong, one CPU", ls1.median / pp1);
  b->shutdown();
  b->join();
  return 0;
}
