#pragma once
/// sudo, su and doas contexts: a Python agent started through a privilege-changing
/// program that may ask for a password. The child's stdin and stdout are pipes (as
/// with local()); a pseudo-terminal of its own is its controlling terminal, so that
/// a password prompt written to /dev/tty reaches us and is answered once. See
/// docs/become.md.
#include <optional>
#include <string>
#include <vector>

#include "mitogen/context/context.hpp"
#include "mitogen/context/local.hpp"
#include "mitogen/routing/router.hpp"

namespace mitogen {

/// Options shared by sudo(), su() and doas(). Prompt and failure texts are matched
/// case-insensitively (ASCII letters; other bytes exactly) as substrings of what the
/// child writes to its terminal or its stderr during the bootstrap. An empty list
/// means the method's defaults (become_defaults()).
struct become_options : connect_options {
  /// The target user. Default root (sudo: or the -u of sudo_args).
  std::optional<std::string> username;
  /// Answers the first password prompt. Never logged, never on a command line.
  std::optional<std::string> password;
  /// A prompt: a partial line (no newline yet) containing one of these.
  std::vector<std::string> password_prompts;
  /// After the password was sent, a line containing one of these means it was wrong
  /// (a second prompt means the same).
  std::vector<std::string> incorrect_prompts;
  /// A line containing one of these means the user may not do this at all.
  std::vector<std::string> not_allowed_prompts;
};

/// Options of sudo(). Upstream Mitogen's names.
struct sudo_options : become_options {
  std::string sudo_path = "sudo";
  /// Extra sudo flags, parsed as upstream does: -E/--preserve-env, -H/--set-home,
  /// -i/--login, -u/--user USER, -r/--role ROLE, -t/--type TYPE; -S/--stdin and
  /// -n/--non-interactive are accepted and ignored (the prompt is always answered on
  /// the terminal). Anything else throws stream_error(spawn_failed).
  std::vector<std::string> sudo_args;
  bool preserve_env = false;  ///< -E
  bool set_home = false;      ///< -H
  bool login = false;         ///< -i: run the interpreter through the target's login shell
  std::optional<std::string> selinux_role;  ///< -r
  std::optional<std::string> selinux_type;  ///< -t
};

/// Options of su(). su reads the password from stdin (Linux-PAM) or the terminal
/// (BSD); both are answered.
struct su_options : become_options {
  std::string su_path = "su";
};

/// Options of doas().
struct doas_options : become_options {
  std::string doas_path = "doas";
};

/// Start a context as another user through sudo / su / doas and wait for its
/// bootstrap. Any thread except the broker's. The context is named "sudo.<user>",
/// "su.<user>" or "doas.<user>". Everything is over within connect_timeout. Throws
/// stream_error with:
///  * become_password_wrong: the password was refused;
///  * become_password_required: a password prompt came and no password was given;
///  * become_not_allowed: no sudoers / doas rule lets the user do this;
///  * connect_timeout: no bootstrap in time (the message says whether a prompt was
///    seen and answered);
///  * spawn_failed, child_died, bootstrap_failed as local().
context sudo(router& r, const sudo_options& opts);
context su(router& r, const su_options& opts);
context doas(router& r, const doas_options& opts);

/// The default prompt and failure texts of a method ("sudo", "su" or "doas").
struct become_patterns {
  std::vector<std::string> password_prompts;
  std::vector<std::string> incorrect_prompts;
  std::vector<std::string> not_allowed_prompts;
  std::vector<std::string> password_required;  ///< the program says a password is needed
};
become_patterns become_defaults(const std::string& method);

/// The argv sudo() runs (without the password, which never appears in it).
std::vector<std::string> sudo_command(const sudo_options& opts, const std::vector<std::string>& python);

}  // namespace mitogen
