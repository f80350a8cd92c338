#pragma once
// Test helpers for the multiplexer daemon: a private directory, an in-process
// daemon on a socket in it, and stacks of local contexts.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "mitogen/context/context.hpp"
#include "mitogen/mux/client.hpp"
#include "mitogen/mux/daemon.hpp"
#include "mitogen/mux/paths.hpp"

namespace mitogen::test {

/// A fresh 0700 directory under /tmp, removed with what it holds.
struct temp_dir {
  std::string path;
  temp_dir() {
    char t[] = "/tmp/mux-test-XXXXXX";
    REQUIRE(::mkdtemp(t));
    path = t;
    ::chmod(t, 0700);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

/// An in-process daemon on `dir/mux.sock`, holding the instance lock as `serve` does.
struct mux_rig {
  temp_dir dir;
  std::string sock = dir.path + "/mux.sock";
  std::shared_ptr<mux::daemon> d;

  explicit mux_rig(mux::config cfg = {}, std::chrono::milliseconds first_client_grace = std::chrono::seconds(60),
                   std::string module_dir = "") {
    std::shared_ptr<mux::instance_lock> lock = mux::instance_lock::try_acquire(mux::lock_path(sock));
    REQUIRE(lock);
    d = mux::daemon::start({.socket_path = sock,
                            .cfg = cfg,
                            .module_dir = std::move(module_dir),
                            .first_client_grace = first_client_grace,
                            .lock = std::move(lock)});
  }
  ~mux_rig() {
    if (d) d->shutdown();
  }
  std::shared_ptr<mux::client> attach() { return mux::client::attach(sock, std::chrono::seconds(10)); }
};

/// A stack of one local context; `flags` make distinct stacks (python3 -E, -s...).
inline wire::value local_stack(std::vector<std::string> flags = {}) {
  wire::list py;
  py.items.emplace_back(wire::str{"/usr/bin/python3"});
  for (auto& f : flags) py.items.emplace_back(wire::str{f});
  wire::dict hop;
  hop.items.emplace_back(wire::str{"method"}, wire::str{"local"});
  hop.items.emplace_back(wire::str{"python_path"}, std::move(py));
  wire::list s;
  s.items.emplace_back(std::move(hop));
  return s;
}

inline std::int64_t pid_of(const context& c) {
  return c.call({.module = "os", .function = "getpid"}, std::chrono::seconds(30)).as<std::int64_t>();
}

inline bool process_gone(std::int64_t pid) {
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return true;
  // A zombie counts as gone (its parent may not have reaped it yet).
  FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (!f) return true;
  char buf[512] = {};
  std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  std::string s(buf, n);
  auto close = s.rfind(')');
  return close != std::string::npos && close + 2 < s.size() && s[close + 2] == 'Z';
}

/// Poll `pred` until it holds or `limit` passes.
inline bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

}  // namespace mitogen::test
