#pragma once
// Test helper: become_fixture.py's users, rules and wrapper scripts, set up once per
// test program (on first use); its temp dir is removed when the program exits.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>

#include "skip.hpp"

#ifndef MITOGEN_BECOME_FIXTURE
#error "define MITOGEN_BECOME_FIXTURE (path of become_fixture.py) and MITOGEN_PYTHON"
#endif

namespace mitogen::test {

class become_fixture {
 public:
  /// The fixture, or nullptr when it cannot be set up here (not root). As root, a
  /// fixture that fails to start throws: the tests must fail, not skip.
  static become_fixture* get() {
    static std::unique_ptr<become_fixture> instance = start();
    return instance.get();
  }
  ~become_fixture() {
    std::string cmd = std::string(MITOGEN_PYTHON) + " " + MITOGEN_BECOME_FIXTURE + " stop " + at("dir");
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "become fixture: stop failed\n");
  }
  const std::string& at(const std::string& k) const { return info_.at(k); }
  bool has(const std::string& k) const { return info_.count(k) && !info_.at(k).empty(); }
  int uid(const std::string& k) const { return std::stoi(at(k)); }

 private:
  static std::unique_ptr<become_fixture> start() {
    if (::geteuid() != 0) return nullptr;
    std::string cmd = std::string(MITOGEN_PYTHON) + " " + MITOGEN_BECOME_FIXTURE + " start";
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return nullptr;
    std::string out;
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    if (::pclose(p) != 0) throw std::runtime_error("become fixture failed to start: " + out);
    auto f = std::unique_ptr<become_fixture>(new become_fixture);
    // Flat JSON object of strings and integers.
    std::size_t i = 0;
    while ((i = out.find('"', i)) != std::string::npos) {
      auto ke = out.find('"', i + 1);
      std::string key = out.substr(i + 1, ke - i - 1);
      auto v = out.find_first_not_of(" :", ke + 1);
      std::string val;
      if (out[v] == '"') {
        auto ve = out.find('"', v + 1);
        val = out.substr(v + 1, ve - v - 1);
        i = ve + 1;
      } else {
        auto ve = out.find_first_of(",}", v);
        val = out.substr(v, ve - v);
        i = ve;
      }
      f->info_[key] = val;
    }
    return f;
  }
  become_fixture() = default;
  std::map<std::string, std::string> info_;
};

}  // namespace mitogen::test

/// Skip the case (reported to ctest as skipped, skip.hpp) where the fixture cannot run.
#define NEED_BECOME(var)                                              \
  auto* var = ::mitogen::test::become_fixture::get();                 \
  if (!var) MITOGEN_SKIP("sudo/su/doas tests need root (to create their users)")
