// mitogen-demo: start a few local contexts and call into them, printing what happens.
#include <unistd.h>

#include <chrono>
#include <iostream>

#include "mitogen/mitogen.hpp"

using namespace mitogen;
using clk = std::chrono::steady_clock;

static double ms_since(clk::time_point t) {
  return std::chrono::duration<double, std::milli>(clk::now() - t).count();
}

int main() {
  auto b = std::make_shared<broker>();
  auto r = router::create(b);
  try {
    auto t0 = clk::now();
    context a = local(*r);
    context n = local(*r, {{.remote_name = "i-have-a-name"}});
    std::cout << "started 2 local contexts in " << ms_since(t0) << " ms: '" << a.name() << "', '" << n.name()
              << "'\n";
    auto pid = a.call({.module = "os", .function = "getpid"});
    std::cout << "os.getpid() in '" << a.name() << "' -> " << pid.as<std::int64_t>() << " (we are " << ::getpid()
              << ")\n";
    auto upper = n.call({.module = "builtins", .function = "upper", .class_name = "str", .args = {{wire::str{"hello from the demo"}}}});
    std::cout << "str.upper(...) in 'i-have-a-name' -> " << upper.as<wire::str>().utf8 << "\n";
    try {
      n.call({.module = "os", .function = "chdir", .args = {{wire::str{"/nonexistent"}}}});
    } catch (const call_error& e) {
      std::cout << "os.chdir('/nonexistent') raised remotely: " << e.type_name() << ": " << e.remote_message()
                << "\n";
    }
    t0 = clk::now();
    constexpr int N = 2000;
    for (int i = 0; i < N; ++i) a.call({.module = "os", .function = "getpid"});
    std::cout << N << " calls in " << ms_since(t0) << " ms (" << ms_since(t0) * 1000 / N << " us each)\n";
  } catch (const std::exception& e) {
    std::cerr << "demo failed: " << e.what() << "\n";
    b->shutdown();
    b->join();
    return 1;
  }
  b->shutdown();
  b->join();
  std::cout << "broker shut down; no contexts left\n";
  return 0;
}
