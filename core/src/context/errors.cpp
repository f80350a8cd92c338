#include "mitogen/context/errors.hpp"

#include <array>
#include <utility>

namespace mitogen {
namespace {

class category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "mitogen.connect"; }
  std::string message(int ev) const override {
    switch (static_cast<connect_errc>(ev)) {
      case connect_errc::connect_timeout: return "connect timeout";
      case connect_errc::spawn_failed: return "the interpreter could not be started";
      case connect_errc::bootstrap_failed: return "bootstrap failed";
      case connect_errc::auth_failed: return "authentication failed";
      case connect_errc::host_key_mismatch: return "host key mismatch";
      case connect_errc::host_key_unknown: return "host key not known";
      case connect_errc::host_unreachable: return "host unreachable";
      case connect_errc::become_password_wrong: return "the password was refused";
      case connect_errc::become_password_required: return "a password is required";
      case connect_errc::become_not_allowed: return "not allowed to become the target user";
    }
    return "unknown connect error";
  }
};

const std::array<std::pair<std::error_code, const char*>, 15>& names() {
  static const std::array<std::pair<std::error_code, const char*>, 15> table{{
      {errc::child_died, "child_died"},
      {errc::protocol_error, "protocol_error"},
      {errc::broker_shut_down, "broker_shut_down"},
      {errc::no_route, "no_route"},
      {errc::timed_out, "timed_out"},
      {connect_errc::connect_timeout, "connect_timeout"},
      {connect_errc::spawn_failed, "spawn_failed"},
      {connect_errc::bootstrap_failed, "bootstrap_failed"},
      {connect_errc::auth_failed, "auth_failed"},
      {connect_errc::host_key_mismatch, "host_key_mismatch"},
      {connect_errc::host_key_unknown, "host_key_unknown"},
      {connect_errc::host_unreachable, "host_unreachable"},
      {connect_errc::become_password_wrong, "become_password_wrong"},
      {connect_errc::become_password_required, "become_password_required"},
      {connect_errc::become_not_allowed, "become_not_allowed"},
  }};
  return table;
}

}  // namespace

const std::error_category& connect_category() noexcept {
  static const category c;
  return c;
}

const char* error_name(const std::error_code& ec) noexcept {
  for (const auto& [code, name] : names())
    if (code == ec) return name;
  return nullptr;
}

std::error_code error_from_name(std::string_view name) noexcept {
  for (const auto& [code, n] : names())
    if (name == n) return code;
  return {};
}

}  // namespace mitogen
