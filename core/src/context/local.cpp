#include "mitogen/context/local.hpp"

#include <pwd.h>
#include <unistd.h>

#include "bootstrap.hpp"
#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "process.hpp"
#include "via.hpp"

namespace mitogen {
namespace {

using detail::python_argv;

}  // namespace

std::string default_remote_name() {
  std::string user = "unknown";
  passwd pwd{}, *pw = nullptr;
  char buf[4096];  // getpwuid_r: contexts may be started from many threads at once
  if (::getpwuid_r(::getuid(), &pwd, buf, sizeof buf, &pw) == 0 && pw) user = pw->pw_name;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return user + "@" + host + ":" + std::to_string(::getpid());
}

context local(router& r, const local_options& o) {
  if (o.via) return detail::connect_via(r, o, "local", {});
  detail::check_can_connect(r, "local");
  auto b = r.get_broker();
  const std::uint32_t id = r.allocate_id();
  // The argv title: mitogen:<remote_name>, by default <user>@<host>:<our pid>.
  const std::string title = o.remote_name.value_or(default_remote_name());
  std::vector<std::string> argv;
  std::optional<std::string> preamble;
  if (o.boot_with) {
    auto custom = o.boot_with({id, r.context_id(), title, o.debug, o.log_level, o.max_message_size});
    argv = std::move(custom.argv);
    preamble = std::move(custom.preamble);
    if (argv.empty()) throw stream_error(make_error_code(connect_errc::spawn_failed), "mitogen: boot_with gave no argv");
  } else {
    argv = python_argv(o.python_path);
    argv.push_back("-c");
    argv.push_back(detail::stage1_command());
  }

  detail::spawned child;
  // A custom first stage may need a real argv[0] (upstream's re-executes sys.executable).
  const std::string argv0 = o.boot_with ? argv.front() : "mitogen:" + title;
  if (auto ec = detail::spawn_piped(argv, argv0, child, o.environment ? &*o.environment : nullptr))
    throw stream_error(make_error_code(connect_errc::spawn_failed),
                       "mitogen: cannot start " + argv.front() + ": " + ec.message());
  // The context's name (its logger, its route): remote_name if given, else
  // local.<child pid> as upstream, so that each child has its own.
  const std::string name = o.remote_name ? *o.remote_name : "local." + std::to_string(child.pid);

  auto boot = std::make_shared<detail::boot_state>();
  boot->wants_status = true;  // a failed start says how the child ended
  detail::start_stderr_reader(b->io(), child.stderr_r, boot, name);
  detail::boot_request req;
  req.id = id;
  req.name = name;
  req.remote_name = title;
  req.s = stream::create(b, child.stdout_r, child.stdin_w,
                         {.name = name, .max_message_size = o.max_message_size, .leader_reads = true});
  req.boot = boot;
  req.opts = &o;
  req.preamble = std::move(preamble);
  // Reap the child whenever its stream goes, whatever the reason.
  req.teardown = [b, pid = child.pid, boot](std::function<void()> done) {
    detail::reap_child(b, pid, std::chrono::milliseconds(1000), std::move(done),
                       [boot](int status) { boot->set_exit_status(status); });
  };
  return detail::run_bootstrap(r, std::move(req));
}

}  // namespace mitogen
