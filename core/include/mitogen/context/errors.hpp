#pragma once
/// Errors of layer 4 (contexts): why a connection could not be made. Category
/// "mitogen.connect"; thrown as stream_error (mitogen/errors.hpp) at the API edge.
/// error_name()/error_from_name() are the one table of the codes' names, for every
/// layer's codes (what Python's StreamError.code and the mux protocol carry).
#include <string_view>
#include <system_error>

#include "mitogen/errors.hpp"

namespace mitogen {

/// Why connecting failed. Category "mitogen.connect".
enum class connect_errc {
  connect_timeout = 1,       ///< bootstrap did not finish within connect_timeout
  spawn_failed,              ///< the interpreter (or ssh, sudo...) could not be started
  bootstrap_failed,          ///< the child answered, but not with the bootstrap markers
  auth_failed,               ///< the server refused every credential offered (SSH)
  host_key_mismatch,         ///< the server's host key differs from the known one (SSH)
  host_key_unknown,          ///< the host is not in known_hosts and the policy is enforce (SSH)
  host_unreachable,          ///< the host could not be resolved or connected to (SSH)
  become_password_wrong,     ///< sudo/su/doas refused the password given
  become_password_required,  ///< sudo/su/doas asked for a password and none was given
  become_not_allowed,        ///< sudo/su/doas refused the user outright (no sudoers/doas rule)
};

const std::error_category& connect_category() noexcept;
inline std::error_code make_error_code(connect_errc e) noexcept { return {static_cast<int>(e), connect_category()}; }

/// "child_died", "auth_failed"...: the name of a code of errc or connect_errc, or
/// nullptr for any other code.
const char* error_name(const std::error_code& ec) noexcept;
/// The inverse of error_name(); an empty code for an unknown name.
std::error_code error_from_name(std::string_view name) noexcept;

}  // namespace mitogen

template <>
struct std::is_error_code_enum<mitogen::connect_errc> : std::true_type {};
