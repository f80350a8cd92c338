// Conformance: our master drives an upstream Mitogen 0.3 child (Debian's
// python3-mitogen), started exactly as upstream's master starts it: its first stage,
// its minified core.py and ExternalContext config (upstream_boot.py prints them).
// Bootstrap, calls, CallError, bytes, log forwarding and module forwarding must work
// as with our own agent.
#include <stdio.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "mitogen/mitogen.hpp"
#include "router_rig.hpp"
#include "skip.hpp"

using namespace mitogen;
using namespace std::chrono_literals;

namespace {

constexpr const char* upstream_core = "/usr/lib/python3/dist-packages/mitogen/core.py";

std::string unhex(const std::string& h) {
  std::string out;
  out.reserve(h.size() / 2);
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

// Upstream's boot command and preamble for `p`, from upstream_boot.py.
custom_boot upstream_boot(const boot_params& p) {
  std::string cmd = std::string(MITOGEN_PYTHON) + " " + MITOGEN_UPSTREAM_BOOT + " " + MITOGEN_PYTHON + " " +
                    std::to_string(p.context_id) + " " + std::to_string(p.parent_id) + " " + p.remote_name + " " +
                    (p.debug ? "1" : "0") + " " + std::to_string(p.log_level) + " " +
                    std::to_string(p.max_message_size);
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) throw std::runtime_error("popen failed");
  std::string text;
  char buf[65536];
  for (std::size_t n; (n = ::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
  if (::pclose(f) != 0) throw std::runtime_error("upstream_boot.py failed");
  custom_boot out;
  std::size_t pos = 0;
  bool in_preamble = false;
  while (pos < text.size()) {
    auto nl = text.find('\n', pos);
    std::string line = text.substr(pos, nl - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    if (in_preamble) out.preamble = unhex(line);
    else if (line == "--preamble--") in_preamble = true;
    else out.argv.push_back(line);
  }
  return out;
}

struct rig : test::router_rig {
  context upstream() {
    local_options o;
    o.boot_with = upstream_boot;
    o.remote_name = "upstream-peer";
    o.connect_timeout = 20s;
    return local(*r, o);
  }
};

}  // namespace

TEST_CASE("an upstream Mitogen child bootstraps and answers calls", "[upstream]") {
  if (::access(upstream_core, R_OK) != 0) MITOGEN_SKIP("python3-mitogen not installed");
  rig t;
  context c = t.upstream();
  auto pid = c.call({.module = "os", .function = "getpid"}).as<std::int64_t>();
  CHECK(pid != ::getpid());
  // Upstream pickles bytes with protocol 2's _codecs.encode spelling.
  std::string data(70000, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31);
  auto v = c.call({.module = "copy", .function = "copy", .args = {{wire::bytes{data}}}});
  CHECK(v == wire::value(wire::bytes{data}));
  auto d = c.call({.module = "builtins", .function = "dict", .kwargs = {{{wire::str{"a"}, std::int64_t{1}}}}});
  CHECK(d == wire::value(wire::dict{{{wire::str{"a"}, std::int64_t{1}}}}));
  try {
    c.call({.module = "os", .function = "chdir", .args = {{wire::str{"/nonexistent"}}}});
    FAIL("no exception");
  } catch (const call_error& e) {
    CHECK(e.type_name() == "builtins.FileNotFoundError");
    CHECK(e.remote_traceback().find("File") != std::string::npos);
  }
  CHECK(c.shutdown(true, 5000ms));
}

TEST_CASE("an upstream Mitogen child forwards its logs", "[upstream]") {
  if (::access(upstream_core, R_OK) != 0) return;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> lines;
  rig t;
  t.r->set_log_sink([&](std::uint32_t, const std::string&, const std::string& logger, int, const std::string& text) {
    std::lock_guard lk(mu);
    lines.push_back(logger + ":" + text);
    cv.notify_all();
  });
  context c = t.upstream();
  c.call({.module = "builtins", .function = "print", .args = {{wire::str{"hello from upstream"}}}});
  std::unique_lock lk(mu);
  CHECK(cv.wait_for(lk, 10s, [&] {
    for (auto& l : lines)
      if (l.find("hello from upstream") != std::string::npos) return true;
    return false;
  }));
}

TEST_CASE("an upstream Mitogen child imports modules served by our responder", "[upstream]") {
  if (::access(upstream_core, R_OK) != 0) return;
  auto dir = std::filesystem::temp_directory_path() / ("mn-upstream-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir / "upkg");
  std::ofstream(dir / "upkg" / "__init__.py") << "";
  std::ofstream(dir / "upkg" / "calc.py") << "def triple(x):\n    return 3 * x\n";
  rig t;
  auto responder = module_responder::create(t.r, {.search_path = {dir.string()}});
  context c = t.upstream();
  CHECK(c.call({.module = "upkg.calc", .function = "triple", .args = {{std::int64_t{14}}}}, 20s).as<std::int64_t>() ==
        42);
  std::filesystem::remove_all(dir);
}
