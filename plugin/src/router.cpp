// Router: the entry point for creating contexts.
#include <condition_variable>
#include <mutex>
#include <thread>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

/// local() blocks until the child has booted. It runs on a helper thread so the
/// caller can wait interruptibly (Ctrl-C during a slow bootstrap must work).
struct pending_local {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool abandoned = false;  // the caller gave up (KeyboardInterrupt)
  std::optional<mitogen::context> ctx;
  std::exception_ptr err;
};

/// Run a connection method (local(), ssh()) on a helper thread and wait for it
/// interruptibly.
mitogen::context start_context(const std::shared_ptr<mitogen::router>& r, std::function<mitogen::context()> connect) {
  // Checked here as well as in local(): a stopped broker's thread id may be reused
  // by our helper thread, and local() would then think it runs on the broker thread.
  if (r->is_shut_down() || r->get_broker()->shutting_down())
    throw mitogen::stream_error(make_error_code(mitogen::errc::broker_shut_down),
                                "mitogen: the router has been shut down");
  auto st = std::make_shared<pending_local>();
  std::thread([st, connect = std::move(connect)] {
    std::optional<mitogen::context> c;
    std::exception_ptr e;
    try {
      c = connect();
    } catch (...) {
      e = std::current_exception();
    }
    std::lock_guard lk(st->mu);
    if (st->abandoned) {
      if (c) c->shutdown(false);  // nobody will ever hold it: do not leave it running
      return;
    }
    st->ctx = std::move(c);
    st->err = e;
    st->done = true;
    st->cv.notify_all();
  }).detach();

  try {
    wait_until(
        [&](std::chrono::milliseconds slice) {
          std::unique_lock lk(st->mu);
          return st->cv.wait_for(lk, slice, [&] { return st->done; });
        },
        std::nullopt);
  } catch (...) {
    std::lock_guard lk(st->mu);
    st->abandoned = true;
    if (st->ctx) st->ctx->shutdown(false);
    throw;
  }
  if (st->err) std::rethrow_exception(st->err);
  return std::move(*st->ctx);
}

/// The core context behind a Python `via=` argument (None: no via).
std::optional<mitogen::context> via_context(const py_router& pr, const py::object& via) {
  if (via.is_none()) return std::nullopt;
  if (!py::isinstance<py_context>(via)) throw py::type_error("via= must be a Context");
  const auto& c = via.cast<const py_context&>().ctx;
  if (c.get_router() != pr.r) throw py::value_error("via= names a context of another router");
  return c;
}

}  // namespace

void register_router(py::module_& m) {
  py::class_<py_router, std::shared_ptr<py_router>>(m, "Router", py::dynamic_attr(),
                                                    "Routes messages between this program and its contexts.")
      .def(py::init([](py::object broker) {
             if (!py::isinstance<py_broker>(broker)) throw py::type_error("Router(broker): broker must be a Broker");
             auto& pb = broker.cast<py_broker&>();
             auto pr = std::make_shared<py_router>();
             pr->r = mitogen::router::create(pb.b);
             pr->broker = std::move(broker);
             pr->r->set_log_sink(&push_context_log);
             return pr;
           }),
           py::arg("broker"))
      .def_property_readonly("broker", [](py_router& self) { return self.broker; })
      .def_property(
          "debug", [](py_router& self) { return self.debug; }, [](py_router& self, bool on) { self.debug = on; },
          "Default of local(debug=...).")
      .def_property(
          "unidirectional", [](py_router& self) { return self.r->unidirectional(); },
          [](py_router& self, bool on) { self.r->set_unidirectional(on); },
          "Upstream's Router.unidirectional: if True, a context's messages to another context's subtree are "
          "forwarded only where this program allowed it (a Sender it handed over); see docs/security.md.")
      .def_property_readonly(
          "context_id", [](py_router& self) { return self.r->context_id(); }, "This program's context id (0).")
      .def(
          "_local",
          [](py::object self, std::optional<std::string> remote_name, std::vector<std::string> python_path,
             bool debug, double connect_timeout, std::optional<std::string> name, int log_level, py::object via,
             std::optional<std::uint32_t> max_message_size) {
            auto& pr = self.cast<py_router&>();
            mitogen::local_options o;
            o.via = via_context(pr, via);
            o.python_path = std::move(python_path);
            o.remote_name = std::move(remote_name);
            o.debug = debug;
            o.log_level = log_level;
            if (max_message_size) o.max_message_size = *max_message_size;
            o.connect_timeout = std::chrono::milliseconds(static_cast<long>(connect_timeout * 1000));
            auto r = pr.r;
            auto title = o.remote_name.value_or(mitogen::default_remote_name());
            mitogen::context c = start_context(r, [r, o = std::move(o)] { return mitogen::local(*r, o); });
            pr.remote_names[c.id()] = std::move(title);
            if (name) c = mitogen::context(c.get_router(), c.id(), *name);
            return make_context(std::move(c), self);
          },
          py::arg("remote_name"), py::arg("python_path"), py::arg("debug"), py::arg("connect_timeout"),
          py::arg("name"), py::arg("log_level"), py::arg("via") = py::none(),
          py::arg("max_message_size") = py::none(), "Start a local context (see mitogen_native.master.Router.local).")
      .def(
          "_ssh",
          [](py::object self, py::dict kw) {
            auto& pr = self.cast<py_router&>();
            mitogen::ssh_options o;
            auto get = [&](const char* k) -> py::object { return kw.contains(k) ? py::object(kw[k]) : py::none(); };
            o.via = via_context(pr, get("via"));
            o.hostname = get("hostname").cast<std::string>();
            if (auto v = get("port"); !v.is_none()) o.port = v.cast<std::uint16_t>();
            if (auto v = get("username"); !v.is_none()) o.username = v.cast<std::string>();
            if (auto v = get("password"); !v.is_none()) o.password = v.cast<std::string>();
            if (auto v = get("identity_files"); !v.is_none()) o.identity_files = v.cast<std::vector<std::string>>();
            if (auto v = get("known_hosts_file"); !v.is_none()) o.known_hosts_file = v.cast<std::string>();
            if (auto v = get("ssh_config_file"); !v.is_none()) o.ssh_config_file = v.cast<std::string>();
            if (auto v = get("python_path"); !v.is_none()) o.python_path = v.cast<std::vector<std::string>>();
            if (auto v = get("remote_name"); !v.is_none()) o.remote_name = v.cast<std::string>();
            if (auto v = get("ssh_path"); !v.is_none()) o.ssh_path = v.cast<std::string>();
            if (auto v = get("ssh_args"); !v.is_none()) o.ssh_args = v.cast<std::vector<std::string>>();
            if (auto v = get("connect_timeout"); !v.is_none())
              o.connect_timeout = std::chrono::milliseconds(static_cast<long>(v.cast<double>() * 1000));
            if (auto v = get("keepalive_interval"); !v.is_none())
              o.keepalive_interval = std::chrono::seconds(static_cast<long>(v.cast<double>()));
            if (auto v = get("keepalive_count"); !v.is_none()) o.keepalive_count = v.cast<int>();
            if (auto v = get("use_agent"); !v.is_none()) o.use_agent = v.cast<bool>();
            if (auto v = get("compression"); !v.is_none()) o.compression = v.cast<bool>();
            if (auto v = get("max_message_size"); !v.is_none()) o.max_message_size = v.cast<std::uint32_t>();
            o.debug = get("debug").cast<bool>();
            o.log_level = get("log_level").cast<int>();
            auto policy = get("check_host_keys").cast<std::string>();
            if (policy == "enforce")
              o.check_host_keys = mitogen::host_key_policy::enforce;
            else if (policy == "accept")
              o.check_host_keys = mitogen::host_key_policy::accept;
            else if (policy == "ignore")
              o.check_host_keys = mitogen::host_key_policy::ignore;
            else
              throw py::value_error("check_host_keys must be 'enforce', 'accept' or 'ignore'");
            auto transport = get("transport").cast<std::string>();
            if (transport == "libssh2")
              o.transport = mitogen::ssh_transport::libssh2;
            else if (transport == "openssh")
              o.transport = mitogen::ssh_transport::openssh;
            else
              throw py::value_error("transport must be 'libssh2' or 'openssh'");
            auto r = pr.r;
            auto title = o.remote_name.value_or(mitogen::default_remote_name());
            mitogen::context c = start_context(r, [r, o = std::move(o)] { return mitogen::ssh(*r, o); });
            pr.remote_names[c.id()] = std::move(title);
            if (auto v = get("name"); !v.is_none()) c = mitogen::context(c.get_router(), c.id(), v.cast<std::string>());
            return make_context(std::move(c), self);
          },
          py::arg("options"), "Start an SSH context (see mitogen_native.master.Router.ssh).")
      .def(
          "_become",
          [](py::object self, const std::string& method, py::dict kw) {
            auto& pr = self.cast<py_router&>();
            auto get = [&](const char* k) -> py::object { return kw.contains(k) ? py::object(kw[k]) : py::none(); };
            // The options every become method shares.
            auto fill = [&](mitogen::become_options& o) {
              if (auto v = get("username"); !v.is_none()) o.username = v.cast<std::string>();
              if (auto v = get("password"); !v.is_none()) o.password = v.cast<std::string>();
              if (auto v = get("password_prompts"); !v.is_none())
                o.password_prompts = v.cast<std::vector<std::string>>();
              if (auto v = get("incorrect_prompts"); !v.is_none())
                o.incorrect_prompts = v.cast<std::vector<std::string>>();
              if (auto v = get("not_allowed_prompts"); !v.is_none())
                o.not_allowed_prompts = v.cast<std::vector<std::string>>();
              if (auto v = get("python_path"); !v.is_none()) o.python_path = v.cast<std::vector<std::string>>();
              if (auto v = get("remote_name"); !v.is_none()) o.remote_name = v.cast<std::string>();
              if (auto v = get("connect_timeout"); !v.is_none())
                o.connect_timeout = std::chrono::milliseconds(static_cast<long>(v.cast<double>() * 1000));
              o.debug = get("debug").cast<bool>();
              o.log_level = get("log_level").cast<int>();
              if (auto v = get("max_message_size"); !v.is_none()) o.max_message_size = v.cast<std::uint32_t>();
              o.via = via_context(pr, get("via"));
            };
            std::function<mitogen::context()> connect;
            auto r = pr.r;
            if (method == "sudo") {
              mitogen::sudo_options o;
              fill(o);
              if (auto v = get("sudo_path"); !v.is_none()) o.sudo_path = v.cast<std::string>();
              if (auto v = get("sudo_args"); !v.is_none()) o.sudo_args = v.cast<std::vector<std::string>>();
              if (auto v = get("preserve_env"); !v.is_none()) o.preserve_env = v.cast<bool>();
              if (auto v = get("set_home"); !v.is_none()) o.set_home = v.cast<bool>();
              if (auto v = get("login"); !v.is_none()) o.login = v.cast<bool>();
              if (auto v = get("selinux_role"); !v.is_none()) o.selinux_role = v.cast<std::string>();
              if (auto v = get("selinux_type"); !v.is_none()) o.selinux_type = v.cast<std::string>();
              connect = [r, o = std::move(o)] { return mitogen::sudo(*r, o); };
            } else if (method == "su") {
              mitogen::su_options o;
              fill(o);
              if (auto v = get("su_path"); !v.is_none()) o.su_path = v.cast<std::string>();
              connect = [r, o = std::move(o)] { return mitogen::su(*r, o); };
            } else if (method == "doas") {
              mitogen::doas_options o;
              fill(o);
              if (auto v = get("doas_path"); !v.is_none()) o.doas_path = v.cast<std::string>();
              connect = [r, o = std::move(o)] { return mitogen::doas(*r, o); };
            } else {
              throw py::value_error("method must be 'sudo', 'su' or 'doas'");
            }
            auto title = get("remote_name").is_none() ? mitogen::default_remote_name()
                                                      : get("remote_name").cast<std::string>();
            mitogen::context c = start_context(r, std::move(connect));
            pr.remote_names[c.id()] = std::move(title);
            if (auto v = get("name"); !v.is_none()) c = mitogen::context(c.get_router(), c.id(), v.cast<std::string>());
            return make_context(std::move(c), self);
          },
          py::arg("method"), py::arg("options"),
          "Start a context through sudo, su or doas (see mitogen_native.master.Router.sudo).")
      .def(
          "_module_stats",
          [](py_router& self) {
            py::dict d;
            if (!self.responder) return d;
            auto st = self.responder->get_stats();
            d["requests"] = st.requests;
            d["modules_sent"] = st.modules_sent;
            d["negatives_sent"] = st.negatives_sent;
            d["refused"] = st.refused;
            d["bytes_sent"] = st.bytes_sent;
            return d;
          },
          "Counters of the module responder (GET_MODULE requests handled, LOAD_MODULE sent...), for tests.")
      .def(
          "_modules_sent_to",
          [](py_router& self, std::uint32_t id) {
            return self.responder ? self.responder->sent_to(id) : std::vector<std::string>{};
          },
          py::arg("context_id"), "Names the module responder sent to context `context_id`, for tests.")
      .def(
          "context_by_id",
          [](py::object self, std::uint32_t id, std::optional<std::string> name) {
            auto& pr = self.cast<py_router&>();
            return make_context(mitogen::context(pr.r, id, name ? *name : pr.r->name_of(id)), self);
          },
          py::arg("context_id"), py::arg("name") = py::none(), "A Context for a known context id.")
      .def(
          "_disconnect",
          [](py_router& self, std::uint32_t id) {
            // Only a context whose own stream this router holds, as upstream.
            if (self.r->routed_via(id) != id) return false;
            auto s = self.r->stream_for(id);
            if (!s) return false;
            nogil g;
            s->close(make_error_code(mitogen::errc::child_died), "disconnected by Router.disconnect()");
            return true;
          },
          py::arg("context_id"),
          "Close the stream of directly connected context `context_id`; False if there is none.")
      .def(
          "shutdown",
          [](py_router& self) { self.r->shutdown(); },
          "Ask this router's contexts to exit, then (once they have, or after half a second) close their "
          "streams and release its waiting callers. The broker keeps running. Does not block.");
}

}  // namespace mitogen::python
