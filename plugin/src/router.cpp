// Router: the entry point for creating contexts.
#include <chrono>
#include <condition_variable>
#include <initializer_list>
#include <mutex>
#include <set>
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

/// The one way connection options reach the extension (for every method): a dict
/// that mitogen_native.master.Router already checked and normalised (_options.py),
/// read here into the core's option structs. A key nobody read is a bug in that
/// layer, refused rather than silently dropped.
class options_reader {
 public:
  options_reader(const py_router& pr, py::dict d) : pr_(pr), d_(std::move(d)) {}

  /// `out` = the value of `key`, if present and not None.
  template <class T>
  void get(const char* key, T& out) {
    if (auto v = take(key); !v.is_none()) out = v.cast<T>();
  }
  template <class T>
  void get(const char* key, std::optional<T>& out) {
    if (auto v = take(key); !v.is_none()) out = v.cast<T>();
  }
  /// Seconds (a float) into a duration.
  template <class D>
  void seconds(const char* key, D& out) {
    if (auto v = take(key); !v.is_none())
      out = std::chrono::duration_cast<D>(std::chrono::duration<double>(v.cast<double>()));
  }
  /// One of the names in `choices`, as its value.
  template <class E>
  void choice(const char* key, E& out, std::initializer_list<std::pair<const char*, E>> choices) {
    auto v = take(key);
    if (v.is_none()) return;
    auto text = v.cast<std::string>();
    std::string names;
    for (auto& [name, value] : choices) {
      if (text == name) {
        out = value;
        return;
      }
      names += (names.empty() ? "'" : ", '") + std::string(name) + "'";
    }
    throw py::value_error(std::string(key) + " must be one of " + names);
  }
  /// The options every connection method takes.
  void common(mitogen::connect_options& o) {
    get("python_path", o.python_path);
    get("remote_name", o.remote_name);
    seconds("connect_timeout", o.connect_timeout);
    get("debug", o.debug);
    get("log_level", o.log_level);
    get("max_message_size", o.max_message_size);
    o.via = via_context(pr_, take("via"));
  }
  /// Every key given a value was read (None means "not given", whatever the key).
  void check_all_read() const {
    for (auto item : d_) {
      auto key = item.first.cast<std::string>();
      if (!item.second.is_none() && !read_.count(key))
        throw py::type_error("unexpected option for this connection method: " + key);
    }
  }

 private:
  py::object take(const char* key) {
    read_.insert(key);
    return d_.contains(key) ? py::object(d_[key]) : py::none();
  }
  const py_router& pr_;
  py::dict d_;
  std::set<std::string> read_;
};

/// The become options every method shares (sudo, su, doas).
void read_become(options_reader& in, mitogen::become_options& o) {
  in.common(o);
  in.get("username", o.username);
  in.get("password", o.password);
  in.get("password_prompts", o.password_prompts);
  in.get("incorrect_prompts", o.incorrect_prompts);
  in.get("not_allowed_prompts", o.not_allowed_prompts);
}

/// Start a context with `method` and wrap it for Python.
py::object connect(py_router& pr, py::object self, const std::string& method, options_reader in) {
  auto r = pr.r;
  std::function<mitogen::context()> start;
  std::optional<std::string> remote_name;
  if (method == "local") {
    mitogen::local_options o;
    in.common(o);
    remote_name = o.remote_name;
    start = [r, o = std::move(o)] { return mitogen::local(*r, o); };
  } else if (method == "ssh") {
    mitogen::ssh_options o;
    in.common(o);
    in.get("hostname", o.hostname);
    in.get("port", o.port);
    in.get("username", o.username);
    in.get("password", o.password);
    in.get("identity_files", o.identity_files);
    in.get("known_hosts_file", o.known_hosts_file);
    in.get("ssh_config_file", o.ssh_config_file);
    in.get("ssh_path", o.ssh_path);
    in.get("ssh_args", o.ssh_args);
    in.seconds("keepalive_interval", o.keepalive_interval);
    in.get("keepalive_count", o.keepalive_count);
    in.get("use_agent", o.use_agent);
    in.get("compression", o.compression);
    in.choice("check_host_keys", o.check_host_keys,
              {{"enforce", mitogen::host_key_policy::enforce},
               {"accept", mitogen::host_key_policy::accept},
               {"ignore", mitogen::host_key_policy::ignore}});
    in.choice("transport", o.transport,
              {{"libssh2", mitogen::ssh_transport::libssh2}, {"openssh", mitogen::ssh_transport::openssh}});
    remote_name = o.remote_name;
    start = [r, o = std::move(o)] { return mitogen::ssh(*r, o); };
  } else if (method == "sudo") {
    mitogen::sudo_options o;
    read_become(in, o);
    in.get("sudo_path", o.sudo_path);
    in.get("sudo_args", o.sudo_args);
    in.get("preserve_env", o.preserve_env);
    in.get("set_home", o.set_home);
    in.get("login", o.login);
    in.get("selinux_role", o.selinux_role);
    in.get("selinux_type", o.selinux_type);
    remote_name = o.remote_name;
    start = [r, o = std::move(o)] { return mitogen::sudo(*r, o); };
  } else if (method == "su") {
    mitogen::su_options o;
    read_become(in, o);
    in.get("su_path", o.su_path);
    remote_name = o.remote_name;
    start = [r, o = std::move(o)] { return mitogen::su(*r, o); };
  } else if (method == "doas") {
    mitogen::doas_options o;
    read_become(in, o);
    in.get("doas_path", o.doas_path);
    remote_name = o.remote_name;
    start = [r, o = std::move(o)] { return mitogen::doas(*r, o); };
  } else {
    throw py::value_error("method must be 'local', 'ssh', 'sudo', 'su' or 'doas'");
  }
  std::optional<std::string> name;
  in.get("name", name);
  in.check_all_read();
  mitogen::context c = start_context(r, std::move(start));
  pr.remote_names[c.id()] = remote_name.value_or(mitogen::default_remote_name());
  if (name) c = mitogen::context(c.get_router(), c.id(), *name);
  return make_context(std::move(c), self);
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
          "_connect",
          [](py::object self, const std::string& method, py::dict options) {
            auto& pr = self.cast<py_router&>();
            return connect(pr, self, method, options_reader(pr, options));
          },
          py::arg("method"), py::arg("options"),
          "Start a context: method 'local', 'ssh', 'sudo', 'su' or 'doas', with the options "
          "mitogen_native.master.Router checked and normalised (see its methods).")
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
