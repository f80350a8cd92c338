// bench_ssh: SSH figures of the C++ API against the loopback sshd of
// tests/core/context/ssh/sshd_fixture.py (started here, or taken from MITOGEN_SSHD_INFO).
// Usage: bench_ssh [calls] [parallel]   (needs root and openssh-server)
// Prints a table and one "RESULT {json}" line (read by bench_ssh_upstream.py).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "mitogen/mitogen.hpp"
#include "sshd.hpp"

using namespace mitogen;
using clk = std::chrono::steady_clock;

namespace {

double ms(clk::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
double us(clk::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double pct(std::vector<double> v, int p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, v.size() * p / 100)];
}

}  // namespace

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::atoi(argv[1]) : 5000;
  const int parallel = argc > 2 ? std::atoi(argv[2]) : 50;
  auto* srv = test::sshd::get();
  if (!srv) {
    std::fprintf(stderr, "bench_ssh: no loopback sshd (needs root and openssh-server)\n");
    return 1;
  }
  auto b = std::make_shared<broker>();
  auto r = router::create(b);
  call_spec noop{.module = "os", .function = "getpid"};

  auto boot_figure = [&](ssh_transport tr) {
    std::vector<double> v;
    for (int i = 0; i < 10; ++i) {
      auto o = srv->key_login();
      o.transport = tr;
      auto t0 = clk::now();
      context c = ssh(*r, o);
      c.call(noop);
      v.push_back(ms(clk::now() - t0));
      c.shutdown(true);
    }
    return median(v);
  };
  const double boot = boot_figure(ssh_transport::libssh2);
  const double boot_openssh = boot_figure(ssh_transport::openssh);

  // `parallel` contexts started at once, from as many threads; wall time until every
  // one has answered its first call. Best of 3 rounds.
  double par = 1e18;
  for (int round = 0; round < 3; ++round) {
    std::vector<context> cs;
    cs.reserve(parallel);
    std::vector<std::thread> ts;
    std::vector<std::optional<context>> got(parallel);
    auto t0 = clk::now();
    for (int i = 0; i < parallel; ++i)
      ts.emplace_back([&, i] {
        got[i] = ssh(*r, srv->key_login());
        got[i]->call(noop);
      });
    for (auto& t : ts) t.join();
    par = std::min(par, ms(clk::now() - t0));
    for (auto& c : got) c->shutdown(false);
    for (auto& c : got) c->shutdown(true);
  }

  context c = ssh(*r, srv->key_login());
  for (int i = 0; i < 500; ++i) c.call(noop);  // warm up
  std::vector<double> lat;
  lat.reserve(calls);
  for (int i = 0; i < calls; ++i) {
    auto t0 = clk::now();
    c.call(noop);
    lat.push_back(us(clk::now() - t0));
  }

  std::printf("%-46s %12s\n", "figure (mitogen-native, libssh2 in-process)", "value");
  std::printf("%-46s %9.1f ms\n", "ssh bootstrap to first call (median of 10)", boot);
  std::printf("%-46s %9.1f ms\n", "  same, transport=openssh", boot_openssh);
  std::printf("%-46s %9.1f ms\n", (std::to_string(parallel) + " ssh contexts at once (best of 3)").c_str(), par);
  std::printf("%-46s %9.1f us (p99 %.1f)\n", "no-op call over ssh (median)", median(lat), pct(lat, 99));
  std::printf("RESULT {\"boot_ms\": %.2f, \"boot_openssh_ms\": %.2f, \"parallel\": %d, \"parallel_ms\": %.2f, "
              "\"call_us\": %.2f, \"call_p99_us\": %.2f}\n",
              boot, boot_openssh, parallel, par, median(lat), pct(lat, 99));
  std::fflush(stdout);
  b->shutdown();
  b->join();
  return 0;
}
