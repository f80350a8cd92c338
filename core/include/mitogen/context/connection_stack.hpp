#pragma once
/// Connection stacks: the one way to name a context by how it is reached, as a list
/// of hops, outermost first ("ssh to web1, then sudo to root"). Each hop is a dict
/// whose keys are exactly the keyword arguments of the Python API's
/// Router.local/ssh/sudo/su/doas plus 'method' (`via` excepted: the previous hop is
/// the via). Parsed once here, so the multiplexer daemon and the Python extension
/// read options the same way (docs/ansible.md, "The multiplexer daemon").
#include <cstddef>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "mitogen/context/become.hpp"
#include "mitogen/context/context.hpp"
#include "mitogen/context/local.hpp"
#include "mitogen/context/ssh.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen {

/// A connection stack that cannot be used: an unknown method or key, a value of the
/// wrong type. The message names the hop (index and method) and the key.
class stack_error : public error {
 public:
  using error::error;
};

/// One hop: a connection method and its options. Plain value type.
struct hop {
  /// "local", "ssh", "sudo", "su" or "doas".
  std::string method;
  /// The options of `method` (the alternative matching it). `via` is never set here:
  /// connect_hop() passes the previous hop's context.
  std::variant<local_options, ssh_options, sudo_options, su_options, doas_options> options;
};

/// A list of hops, outermost first. Never empty once parsed.
using connection_stack = std::vector<hop>;

/// Parse hop dicts (a wire list or tuple of dicts with str keys). Values take the
/// Python API's types: str, int, float, bool, None (= not given), lists of str;
/// passwords may be str, bytes or mitogen.core.Secret. Throws stack_error.
connection_stack parse_connection_stack(const wire::value& v);
/// Parse one hop dict; `index` is only used in error messages.
hop parse_hop(const wire::value& v, std::size_t index = 0);

/// The identity of a hop: what makes two hops reach the same context (method,
/// host, port, user, identity files, transport, host key policy, interpreter,
/// become program and flags, and the password as a keyed hash: a context is never
/// handed to a request with another password or none, which must fail as it would
/// on a new connection). Excludes timeouts, keepalive, debug, name, remote_name
/// and prompt texts. Defaults are normalised (an identity_file given as one string
/// or a list of one, a sudo/su/doas user left unset or "root", check_host_keys
/// unset or 'enforce' give the same key). Never contains a password; the hash's
/// key is random per process, so keys are only comparable within one.
std::string hop_key(const hop& h);
/// The identity of the first `n` hops of `s` (all if n is larger): hop keys joined
/// so that no two different stacks share a key.
std::string stack_key(const connection_stack& s, std::size_t n = static_cast<std::size_t>(-1));

/// A short description for logs and status, never with a password:
/// "ssh deploy@web1:2222", "sudo root", "local".
std::string describe_hop(const hop& h);
/// The hops' descriptions joined with " -> ".
std::string describe_stack(const connection_stack& s, std::size_t n = static_cast<std::size_t>(-1));

/// Start the context of `h`, through `via` when set (the previous hop's context).
/// Blocks like local()/ssh()/sudo(): any thread except the broker's. Throws what
/// they throw (stream_error with the failure's errc).
context connect_hop(router& r, const hop& h, const std::optional<context>& via);

}  // namespace mitogen
