#pragma once
// Private: the few ~/.ssh/config keywords the libssh2 transport honours.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mitogen::detail {

/// What an ssh_config file says about one host (first value wins, as in OpenSSH;
/// IdentityFile accumulates). Tokens and `~` in IdentityFile are expanded by
/// expand_ssh_path(), once the final host and user are known.
struct ssh_host_config {
  std::optional<std::string> hostname;
  std::optional<std::string> user;
  std::optional<std::uint16_t> port;
  std::vector<std::string> identity_files;
};

/// OpenSSH-style pattern match: `*` any run, `?` one character, case-insensitive.
bool ssh_pattern_match(std::string_view pattern, std::string_view s);

/// Parse the text of an ssh_config file for `host` (the name given by the user, not
/// yet replaced by HostName). Understands Host (patterns with `*`, `?`, `!`), HostName
/// (with %h), User, Port, IdentityFile; `Match` blocks are skipped (except `Match
/// all`), `Include` and every other keyword are ignored.
ssh_host_config parse_ssh_config(std::string_view text, std::string_view host);

/// Expand `~`, %d (home), %u (local user), %h (host), %r (remote user), %p (port), %%.
std::string expand_ssh_path(std::string_view path, const std::string& home, const std::string& local_user,
                            const std::string& host, const std::string& remote_user, std::uint16_t port);

}  // namespace mitogen::detail
