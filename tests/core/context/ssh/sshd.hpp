#pragma once
// Test helper: the loopback sshd of tests/core/context/ssh/sshd_fixture.py, started once per
// test program (on first use) and stopped when the program exits.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "mitogen/context/ssh.hpp"

#ifndef MITOGEN_SSHD_FIXTURE
#error "define MITOGEN_SSHD_FIXTURE (path of sshd_fixture.py) and MITOGEN_PYTHON"
#endif

namespace mitogen::test {

class sshd {
 public:
  /// The running server, or nullptr when it cannot run here (not root, no sshd).
  static sshd* get() {
    static std::unique_ptr<sshd> instance = start();
    return instance.get();
  }
  ~sshd() {
    if (!owned_) return;
    std::string cmd = std::string(MITOGEN_PYTHON) + " " + MITOGEN_SSHD_FIXTURE + " stop " + at("dir");
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "sshd fixture: stop failed\n");
  }

  const std::string& at(const std::string& k) const { return info_.at(k); }
  std::uint16_t port() const { return static_cast<std::uint16_t>(std::stoi(at("port"))); }
  pid_t pid() const { return static_cast<pid_t>(std::stoi(at("pid"))); }

  /// Options for a key login as mitogen-test, host key checked against the fixture's
  /// known_hosts, no agent, no ~/.ssh/config.
  ssh_options key_login() const {
    ssh_options o;
    o.hostname = at("host");
    o.port = port();
    o.username = at("user");
    o.identity_files = {at("identity_file")};
    o.use_agent = false;
    o.known_hosts_file = at("known_hosts");
    o.ssh_config_file = "";
    o.connect_timeout = std::chrono::seconds(20);
    return o;
  }

  /// The sshd processes serving connections (children of the listener), not the
  /// listener itself and not the agents they run.
  std::vector<pid_t> session_processes() const {
    std::vector<pid_t> out;
    std::string cmd = std::string(MITOGEN_PYTHON) + " " + MITOGEN_SSHD_FIXTURE + " sessions " + at("pid");
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return out;
    int v;
    while (std::fscanf(p, "%d", &v) == 1) {
      std::ifstream comm("/proc/" + std::to_string(v) + "/comm");
      std::string name;
      comm >> name;
      if (name == "sshd") out.push_back(v);
    }
    ::pclose(p);
    return out;
  }

 private:
  static std::unique_ptr<sshd> start() {
    std::string out;
    bool owned = true;
    if (const char* given = std::getenv("MITOGEN_SSHD_INFO"); given && *given) {
      // A server someone else started (bench_ssh_upstream.py): use it, leave it running.
      out = given;
      owned = false;
    } else {
      if (::geteuid() != 0 || ::access("/usr/sbin/sshd", X_OK) != 0) return nullptr;
      std::string cmd = std::string(MITOGEN_PYTHON) + " " + MITOGEN_SSHD_FIXTURE + " start";
      FILE* p = ::popen(cmd.c_str(), "r");
      if (!p) return nullptr;
      char buf[4096];
      std::size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
      if (::pclose(p) != 0) {
        std::fprintf(stderr, "sshd fixture failed: %s\n", out.c_str());
        return nullptr;
      }
    }
    auto s = std::unique_ptr<sshd>(new sshd);
    s->owned_ = owned;
    // Flat JSON object of strings and integers: "key": "value" | number.
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
      s->info_[key] = val;
    }
    return s;
  }
  sshd() = default;
  std::map<std::string, std::string> info_;
  bool owned_ = true;
};

}  // namespace mitogen::test

/// Skip the case (reported to ctest as skipped; include skip.hpp) where the fixture cannot run.
#define NEED_SSHD(var)                                                          \
  auto* var = ::mitogen::test::sshd::get();                                     \
  if (!var) MITOGEN_SKIP("no loopback sshd here (needs root and openssh-server)")
