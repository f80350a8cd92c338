// The mitogen-mux program: starting it detached, exactly once, and stopping it.
#include <spawn.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <fstream>
#include <future>
#include <sstream>

#include "mitogen/wire/value.hpp"
#include "mux_rig.hpp"

extern char** environ;

using namespace mitogen;
using namespace std::chrono_literals;

namespace {

/// Run the program with `args`, `env` added to ours; returns (exit status, stderr),
/// or (-1, why) if it could not be run. No Catch assertions here: several threads
/// run it at once.
std::pair<int, std::string> run(const std::vector<std::string>& args, const std::vector<std::string>& env) {
  std::vector<std::string> argv_s = {MITOGEN_MUX_BIN};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s = env;
  for (char** e = environ; *e; ++e) env_s.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  int err[2];
  if (::pipe2(err, O_CLOEXEC) != 0) return {-1, "pipe2 failed"};
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  pid_t pid;
  const int rc = ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    ::close(err[0]);
    ::close(err[1]);
    return {-1, std::string("posix_spawn failed: ") + std::strerror(rc)};
  }
  ::close(err[1]);
  std::string text;
  char buf[1024];
  ssize_t n;
  while ((n = ::read(err[0], buf, sizeof buf)) > 0) text.append(buf, static_cast<std::size_t>(n));
  ::close(err[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
}

}  // namespace

TEST_CASE("mitogen-mux: several started at once end as exactly one daemon", "[mux][program]") {
  test::temp_dir dir;
  const std::string sock = dir.path + "/mux.sock";
  const std::string cfg = dir.path + "/mux.yaml";
  std::ofstream(cfg) << "idle_timeout: 120\nlog_file: " << dir.path << "/mux.log\n";
  const std::vector<std::string> env = {"MITOGEN_MUX_CONFIG=" + cfg};
  std::vector<std::future<std::pair<int, std::string>>> starts;
  for (int i = 0; i < 4; ++i)
    starts.push_back(std::async(std::launch::async, [&] { return run({"serve", "--detach", "--socket", sock}, env); }));
  int started = 0, refused = 0;
  for (auto& f : starts) {
    auto [rc, err] = f.get();
    INFO(err);
    if (rc == 0) ++started;
    else if (rc == 3) ++refused;  // "already running"
    else FAIL("unexpected exit status " << rc);
  }
  CHECK(started == 1);
  CHECK(refused == 3);

  auto c = mux::client::attach(sock);
  const auto pid = c->daemon_pid();
  CHECK(pid != ::getpid());
  std::ifstream lock(mux::lock_path(sock));
  std::int64_t holder = 0;
  lock >> holder;
  CHECK(holder == pid);
  // Starting again now: refused, the running one stays.
  CHECK(run({"serve", "--detach", "--socket", sock}, env).first == 3);

  // `status` and `stop` from the command line.
  auto [rc, err] = run({"status", "--socket", sock}, env);
  CHECK(rc == 0);
  c->detach();
  CHECK(run({"stop", "--socket", sock}, env).first == 0);
  CHECK(test::process_gone(pid));
  CHECK(run({"status", "--socket", sock}, env).first == 4);  // not running
  CHECK(run({"stop", "--socket", sock}, env).first == 0);    // nothing to stop is fine
}

TEST_CASE("mitogen-mux: a killed daemon's socket is taken over by the next one", "[mux][program]") {
  test::temp_dir dir;
  const std::string sock = dir.path + "/mux.sock";
  const std::string cfg = dir.path + "/mux.yaml";
  std::ofstream(cfg) << "log_file: " << dir.path << "/mux.log\n";
  const std::vector<std::string> env = {"MITOGEN_MUX_CONFIG=" + cfg};
  REQUIRE(run({"serve", "--detach", "--socket", sock}, env).first == 0);
  auto first = mux::client::attach(sock);
  const auto pid = first->daemon_pid();
  first->detach();
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGKILL) == 0);
  REQUIRE(test::eventually([&] { return test::process_gone(pid); }));
  // The socket file is still there, and nothing listens on it.
  CHECK_THROWS_AS(mux::client::attach(sock), std::system_error);
  REQUIRE(run({"serve", "--detach", "--socket", sock}, env).first == 0);
  auto second = mux::client::attach(sock);
  CHECK(second->daemon_pid() != pid);
  second->stop();
  second->detach();
  const auto p2 = second->daemon_pid();
  CHECK(test::eventually([&] { return test::process_gone(p2); }));
}

TEST_CASE("mitogen-mux: a bad settings file or directory stops it with the reason", "[mux][program]") {
  test::temp_dir dir;
  const std::string sock = dir.path + "/mux.sock";
  const std::string cfg = dir.path + "/mux.yaml";
  std::ofstream(cfg) << "idle_timeout: 5\nmax_contexts: many\n";
  auto [rc, err] = run({"serve", "--detach", "--socket", sock}, {"MITOGEN_MUX_CONFIG=" + cfg});
  CHECK(rc == 2);
  CHECK(err == "mitogen-mux: " + cfg + ":2: max_contexts: expected a number of contexts, got 'many'\n");

  const std::string open_dir = dir.path + "/open";
  REQUIRE(::mkdir(open_dir.c_str(), 0777) == 0);
  ::chmod(open_dir.c_str(), 0777);
  std::ofstream(cfg) << "log_file: " << dir.path << "/mux.log\n";
  auto [rc2, err2] = run({"serve", "--detach", "--socket", open_dir + "/mux.sock"}, {"MITOGEN_MUX_CONFIG=" + cfg});
  CHECK(rc2 == 1);
  CHECK(err2.find("is open to other users") != std::string::npos);
}
