#include "mitogen/mux/config.hpp"  // first: the header compiles on its own

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>

using namespace mitogen::mux;

namespace {

std::string yaml_error_of(const std::string& yaml) {
  try {
    parse_config(yaml, "/etc/x/mux.yaml");
  } catch (const config_error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("mux config: defaults, and every setting", "[mux][config]") {
  auto d = parse_config("", "f");
  CHECK(d.idle_timeout == std::chrono::seconds(60));
  CHECK(d.max_contexts == 1000);
  CHECK(d.log_level == "info");
  CHECK(d.log_file.empty());
  CHECK(d.module_dir.empty());
  CHECK(parse_config("# only a comment\n", "f").idle_timeout == std::chrono::seconds(60));

  ::setenv("HOME", "/home/tester", 1);
  auto c = parse_config(
      "idle_timeout: 0\n"
      "max_contexts: 500\n"
      "log_file: ~/mux.log\n"
      "log_level: warn\n"
      "module_dir: /opt/mods\n"
      "connect_threads: 4\n",
      "f");
  CHECK(c.idle_timeout == std::chrono::seconds(0));
  CHECK(c.max_contexts == 500);
  CHECK(c.log_file == "/home/tester/mux.log");
  CHECK(c.log_level == "warning");
  CHECK(c.module_dir == "/opt/mods");
  CHECK(c.connect_threads == 4);
}

TEST_CASE("mux config: a bad file names the file, the line and the key", "[mux][config]") {
  CHECK(yaml_error_of("idle_timeout: 60\nidel_timeout: 5\n") ==
        "/etc/x/mux.yaml:2: unknown key 'idel_timeout' (known: idle_timeout, max_contexts, log_file, log_level, "
        "module_dir, connect_threads)");
  CHECK(yaml_error_of("log_level: info\n\nidle_timeout: soon\n") ==
        "/etc/x/mux.yaml:3: idle_timeout: expected a number of seconds, got 'soon'");
  CHECK(yaml_error_of("max_contexts: 0\n") == "/etc/x/mux.yaml:1: max_contexts: 0 is out of range (1 to 1000000)");
  CHECK(yaml_error_of("idle_timeout: -1\n").find("/etc/x/mux.yaml:1: idle_timeout:") == 0);
  CHECK(yaml_error_of("max_contexts: [1, 2]\n") == "/etc/x/mux.yaml:1: max_contexts: expected a number of contexts, got a list");
  CHECK(yaml_error_of("log_level: loud\n").find("/etc/x/mux.yaml:1: log_level: 'loud' is not one of") == 0);
  CHECK(yaml_error_of("- a\n- b\n").find("/etc/x/mux.yaml:1: expected a mapping") == 0);
  auto syntax = yaml_error_of("idle_timeout: 5\nmax_contexts: [1,\n");
  CHECK(syntax.find("/etc/x/mux.yaml:") == 0);
  CHECK(syntax.find("YAML syntax error") != std::string::npos);
}

TEST_CASE("mux config: a missing file is the defaults unless it was named", "[mux][config]") {
  CHECK(load_config("/nonexistent/mux.yaml", false).max_contexts == 1000);
  CHECK_THROWS_WITH(load_config("/nonexistent/mux.yaml", true),
                    Catch::Matchers::StartsWith("/nonexistent/mux.yaml: cannot read"));
  char dir[] = "/tmp/mux-config-XXXXXX";
  REQUIRE(::mkdtemp(dir));
  std::string path = std::string(dir) + "/mux.yaml";
  std::ofstream(path) << "max_contexts: 7\n";
  CHECK(load_config(path, true).max_contexts == 7);
  std::ofstream(path) << "max_contexts: seven\n";
  CHECK_THROWS_WITH(load_config(path, true), path + ":1: max_contexts: expected a number of contexts, got 'seven'");
  ::unlink(path.c_str());
  ::rmdir(dir);
}
