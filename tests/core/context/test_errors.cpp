// The error model: each layer's codes in their own category, one table of names.
#include <catch2/catch.hpp>

#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/wire/error.hpp"

using namespace mitogen;

TEST_CASE("each layer's codes have their own category; one table names them all", "[errors]") {
  const std::error_code died = errc::child_died, refused = connect_errc::auth_failed;
  CHECK(std::string(died.category().name()) == "mitogen");
  CHECK(std::string(refused.category().name()) == "mitogen.connect");
  CHECK(died != refused);
  CHECK(refused.message() == "authentication failed");
  for (const char* name : {"child_died", "protocol_error", "broker_shut_down", "no_route", "timed_out",
                           "connect_timeout", "spawn_failed", "bootstrap_failed", "auth_failed", "host_key_mismatch",
                           "host_key_unknown", "host_unreachable", "become_password_wrong",
                           "become_password_required", "become_not_allowed"}) {
    const std::error_code ec = error_from_name(name);
    REQUIRE(ec);
    CHECK(std::string(error_name(ec)) == name);
  }
  CHECK_FALSE(error_from_name("no_such_code"));
  // Codes of other layers and of the system have no name here.
  CHECK(error_name(make_error_code(wire::errc::truncated)) == nullptr);
  CHECK(error_name(std::make_error_code(std::errc::io_error)) == nullptr);
}
