// The ~/.ssh/config subset the libssh2 transport reads (private header).
#include "ssh_config.hpp"

#include <catch2/catch.hpp>

using namespace mitogen::detail;

TEST_CASE("ssh_config patterns: * and ? and case", "[ssh][config]") {
  CHECK(ssh_pattern_match("*", "anything"));
  CHECK(ssh_pattern_match("web-*", "web-01"));
  CHECK(ssh_pattern_match("web-??", "WEB-01"));
  CHECK_FALSE(ssh_pattern_match("web-??", "web-001"));
  CHECK(ssh_pattern_match("*.example.com", "a.b.example.com"));
  CHECK_FALSE(ssh_pattern_match("*.example.com", "example.com"));
  CHECK(ssh_pattern_match("a*b*c", "aXXbYYc"));
  CHECK_FALSE(ssh_pattern_match("a*b*c", "aXXbYY"));
}

TEST_CASE("ssh_config: first value wins, IdentityFile accumulates, negation and Match", "[ssh][config]") {
  const char* text =
      "User everyone-first\n"
      "Host web-* !web-secret\n"
      "  HostName %h.internal\n"
      "  Port=2222\n"
      "  IdentityFile ~/.ssh/web\n"
      "Match exec \"true\"\n"
      "  User from-match\n"
      "Host *\n"
      "  User fallback\n"
      "  Port 22\n"
      "  IdentityFile \"~/.ssh/id with space\"\n";
  auto c = parse_ssh_config(text, "web-01");
  CHECK(c.hostname == "web-01.internal");
  CHECK(c.port == 2222);
  CHECK(c.user == "everyone-first");
  REQUIRE(c.identity_files.size() == 2);
  CHECK(c.identity_files[0] == "~/.ssh/web");
  CHECK(c.identity_files[1] == "~/.ssh/id with space");

  auto s = parse_ssh_config(text, "web-secret");
  CHECK_FALSE(s.hostname);
  CHECK(s.port == 22);

  CHECK(expand_ssh_path("~/.ssh/%r@%h:%p", "/home/me", "me", "h", "root", 22) == "/home/me/.ssh/root@h:22");
  CHECK(expand_ssh_path("%d/k%%", "/home/me", "me", "h", "r", 22) == "/home/me/k%");
}
