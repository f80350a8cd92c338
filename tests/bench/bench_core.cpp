// bench_core: latency and start-up figures of the C++ API on local contexts.
// Usage: bench_core [iterations]   (prints a table; see docs/benchmarks.md)
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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
  auto ls = summarize(lat);

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
  b->shutdown();
  b->join();
  return 0;
}
