// Context and Receiver: the call path. Everything between taking the arguments and
// handing back the result happens here, in one C++ call: convert the arguments,
// send, release the GIL, wait, convert the reply.
#include <utility>

#include <spdlog/spdlog.h>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

/// Interned attribute names (leaked: they must outlive static destruction).
struct names {
  PyObject* module = PyUnicode_InternFromString("__module__");
  PyObject* name = PyUnicode_InternFromString("__name__");
  PyObject* qualname = PyUnicode_InternFromString("__qualname__");
  PyObject* closure = PyUnicode_InternFromString("__closure__");
  PyObject* objclass = PyUnicode_InternFromString("__objclass__");
};
const names& attr_names() {
  static auto* n = new names();
  return *n;
}

/// `v` (borrowed, may be null) as UTF-8, or nullopt if it is not a str.
std::optional<std::string> text_of(PyObject* v) {
  std::optional<std::string> out;
  if (v && PyUnicode_Check(v)) {
    Py_ssize_t n;
    if (const char* s = PyUnicode_AsUTF8AndSize(v, &n)) out.emplace(s, static_cast<std::size_t>(n));
    else PyErr_Clear();
  }
  return out;
}

/// getattr(o, name) as UTF-8, or nullopt if missing or not a str.
std::optional<std::string> text_attr(PyObject* o, PyObject* name) {
  PyObject* v = PyObject_GetAttr(o, name);
  if (!v) {
    PyErr_Clear();
    return std::nullopt;
  }
  auto out = text_of(v);
  Py_DECREF(v);
  return out;
}

[[noreturn]] void cannot_call(PyObject* fn, const std::string& why) {
  std::string what = py::repr(fn).cast<std::string>();
  throw py::type_error("cannot call " + what + " remotely: " + why);
}

/// The class part of a call: a class reachable as module.Class.
void set_class(mitogen::call_spec& spec, PyObject* fn, PyObject* cls) {
  auto& n = attr_names();
  auto qual = text_attr(cls, n.qualname);
  auto mod = text_attr(cls, n.module);
  if (!qual || !mod) cannot_call(fn, "its class has no __module__/__qualname__");
  if (qual->find('.') != std::string::npos)
    cannot_call(fn, "its class " + *qual + " is not reachable from module scope");
  spec.module = std::move(*mod);
  spec.class_name = std::move(*qual);
}

/// Which module, class and function the child must look up for `fn`. The child can
/// only find what it can import: module-level functions and classes, and methods of
/// module-level classes that need no instance.
void describe_fn(PyObject* fn, mitogen::call_spec& spec) {
  auto& n = attr_names();
  if (PyMethod_Check(fn)) {
    // Bound method: fine if bound to a class (a classmethod), not to an instance.
    PyObject* self = PyMethod_GET_SELF(fn);
    if (!PyType_Check(self)) cannot_call(fn, "instance methods need the instance, which cannot be sent");
    set_class(spec, fn, self);
    auto name = text_attr(PyMethod_GET_FUNCTION(fn), n.name);
    if (!name) cannot_call(fn, "it has no __name__");
    spec.function = std::move(*name);
    return;
  }
  if (PyCFunction_Check(fn)) {
    // Built-in function (os.getpid: bound to its module) or built-in classmethod
    // (dict.fromkeys: bound to the type); bound to anything else it is an instance's.
    // Its __name__ and __module__ read where getattr() reads them (the method table's
    // name; the writable __module__ slot): most calls are of functions like these.
    auto* cf = reinterpret_cast<PyCFunctionObject*>(fn);
    PyObject* self = PyCFunction_GET_SELF(fn);
    if (self && PyType_Check(self)) {
      set_class(spec, fn, self);
    } else if (self && !PyModule_Check(self)) {
      cannot_call(fn, "instance methods need the instance, which cannot be sent");
    } else {
      auto mod = text_of(cf->m_module);
      if (!mod) cannot_call(fn, "it has no __module__");
      spec.module = std::move(*mod);
    }
    spec.function = cf->m_ml->ml_name;
    return;
  }
  // A Python function: its attributes read where getattr() reads them (its own fields;
  // anything else only from its __dict__), without an AttributeError raised and cleared
  // for the __objclass__ it does not have, on every call.
  auto* pf = PyFunction_Check(fn) ? reinterpret_cast<PyFunctionObject*>(fn) : nullptr;
  // Unbound method of a built-in class, e.g. str.upper: called with the instance as
  // its first argument.
  PyObject* cls = nullptr;
  if (!pf) {
    cls = PyObject_GetAttr(fn, n.objclass);
  } else if (pf->func_dict) {
    cls = PyDict_GetItemWithError(pf->func_dict, n.objclass);
    Py_XINCREF(cls);
  }
  if (cls) {
    py::object hold = py::reinterpret_steal<py::object>(cls);
    if (PyType_Check(cls)) {
      set_class(spec, fn, cls);
      auto name = pf ? text_of(pf->func_name) : text_attr(fn, n.name);
      if (!name) cannot_call(fn, "it has no __name__");
      spec.function = std::move(*name);
      return;
    }
  } else {
    PyErr_Clear();
  }
  // Functions, classes and other callables named by module + qualified name.
  auto name = pf ? text_of(pf->func_name) : text_attr(fn, n.name);
  auto mod = pf ? text_of(pf->func_module) : text_attr(fn, n.module);
  if (!name || !mod) cannot_call(fn, "it has no __module__ and __name__ to find it by");
  if (*name == "<lambda>") cannot_call(fn, "a lambda has no name the child could find it by");
  if (pf) {
    PyObject* closure = PyFunction_GET_CLOSURE(fn);
    if (closure && closure != Py_None) cannot_call(fn, "a closure's captured state cannot be sent");
  }
  auto qual = (pf ? text_of(pf->func_qualname) : text_attr(fn, n.qualname)).value_or(*name);
  if (qual.find("<locals>") != std::string::npos)
    cannot_call(fn, "functions defined inside functions are not reachable from module scope");
  // A plain function found through its class (a staticmethod): module.Class.function.
  auto dot = qual.find('.');
  if (dot != std::string::npos) {
    if (qual.find('.', dot + 1) != std::string::npos) cannot_call(fn, "it is not reachable from module scope");
    spec.class_name = qual.substr(0, dot);
  }
  spec.module = std::move(*mod);
  spec.function = std::move(*name);
}

/// A call's spec: where `fn` is found, the arguments `convert` sets, and the grants
/// for the Senders among them. GIL held.
template <class Convert>
mitogen::call_spec spec_for(PyObject* fn, const char* method, const py_context& dst, Convert&& convert) {
  mitogen::call_spec spec;
  describe_fn(fn, spec);
  // For enable_debug()'s log (the check keeps the call path free of formatting).
  if (spdlog::default_logger_raw()->should_log(spdlog::level::debug))
    spdlog::debug("mitogen: {} {}.{}{}() in context {} ({})", method, spec.module,
                  spec.class_name ? *spec.class_name + "." : std::string(), spec.function, dst.ctx.id(),
                  dst.ctx.name());
  // Senders of ours among the arguments let `dst` send to their handles (channels).
  grant_scope grants;
  convert(spec);
  grants.apply(dst.ctx.id());
  return spec;
}

/// A call's spec from a vectorcall: args[0] is the function, args[1:nargs] its
/// positional arguments, then the values of the keywords named in `kwnames`.
mitogen::call_spec make_spec(PyObject* const* args, std::size_t nargs, PyObject* kwnames, const char* method,
                             const py_context& dst) {
  if (nargs == 0) throw py::type_error(std::string(method) + "() missing the function to call");
  return spec_for(args[0], method, dst, [&](mitogen::call_spec& spec) {
    spec.args = args_to_wire(args + 1, nargs - 1);
    spec.kwargs = kwargs_to_wire(kwnames, args + nargs);
  });
}

mitogen::call_spec make_spec(const py::args& args, const py::kwargs& kw, const char* method, const py_context& dst) {
  if (args.empty()) throw py::type_error(std::string(method) + "() missing the function to call");
  return spec_for(PySequence_Fast_ITEMS(args.ptr())[0], method, dst, [&](mitogen::call_spec& spec) {
    spec.args = args_to_wire(args, 1);
    spec.kwargs = kwargs_to_wire(kw);
  });
}

/// Replies above this size are decoded without the GIL (a 1 MiB copy is ~100 us).
constexpr std::size_t big_reply = 64 * 1024;

py::object result_of(const py_context& c, const wire::message& m) {
  if (m.data.size() < big_reply) return from_wire(c.ctx.result(m), c.router);
  std::optional<wire::value> v;
  {
    nogil g;
    v = c.ctx.result(m);
  }
  return from_wire(std::move(*v), c.router);
}

py::object call_spec_now(const py_context& c, mitogen::call_spec spec) {
  std::shared_ptr<mitogen::receiver> rx;
  std::optional<wire::message> m;
  {
    // One GIL release for send + the first wait slice: most calls end here.
    nogil g;
    rx = c.ctx.call_async(std::move(spec), /*wait_here=*/true);
    m = rx->get_for(signal_poll);
  }
  if (!m) m = wait_message(*rx, std::nullopt);
  return result_of(c, *m);
}

/// Context.call as a METH_FASTCALL method: pybind11's dispatcher would build an
/// args tuple and a kwargs dict for every call. Exceptions are translated as
/// pybind11's dispatcher does.
/// `self` (a Context, or an instance of a subclass: the method descriptor checked)
/// as its C++ object, without pybind11's per-call type lookup when its layout is the
/// simple one (a single pybind11 base, as mitogen_native.core.Context has).
const py_context& context_of(PyObject* self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self);
  if (inst->simple_layout && inst->simple_holder_constructed && inst->simple_value_holder[0])
    return *static_cast<const py_context*>(inst->simple_value_holder[0]);
  return py::handle(self).cast<const py_context&>();  // raises if not initialised
}

PyObject* fast_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    const auto& c = context_of(self);
    return call_spec_now(c, make_spec(args, static_cast<std::size_t>(nargs), kwnames, "call", c)).release().ptr();
  } catch (...) {
    if (py::detail::apply_exception_translators(py::detail::get_local_internals().registered_exception_translators))
      return nullptr;
    if (py::detail::apply_exception_translators(py::detail::get_internals().registered_exception_translators))
      return nullptr;
    PyErr_SetString(PyExc_SystemError, "Context.call: an exception escaped the translators");
    return nullptr;
  }
}

PyMethodDef fast_call_def = {
    "call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_call)), METH_FASTCALL | METH_KEYWORDS,
    "call(fn, *args, **kwargs): run fn(*args, **kwargs) in the context and return its result. "
    "Raises CallError if it raised, ChannelError if the context went away."};

std::string repr(const py_context& c) {
  return "Context(" + std::to_string(c.ctx.id()) + ", " + py::repr(py::str(c.ctx.name())).cast<std::string>() + ")";
}

/// What Context.shutdown() returns: waits for the context to be gone.
struct py_shutdown {
  std::shared_ptr<mitogen::router> r;
  std::uint32_t id;
  std::string name;
  bool ready() const { return r->wait_disconnected(id, std::chrono::milliseconds(0)); }
  void get(std::optional<double> timeout) const {
    if (!wait_until([&](std::chrono::milliseconds slice) { return r->wait_disconnected(id, slice); }, timeout))
      throw mitogen::timeout_error("context " + name + " did not exit within the timeout");
  }
};

}  // namespace

py::object make_context(mitogen::context ctx, const py::object& router) {
  return py::cast(py_context{std::move(ctx), router}, py::return_value_policy::move);
}

void register_context(py::module_& m) {
  // The result classes first, so that the Context methods' signatures show their
  // Python names rather than C++ ones.
  py::class_<py_shutdown>(m, "ShutdownLatch",
                          "What Context.shutdown() returns: get() waits until the context has exited.")
      .def(
          "get",
          [](const py_shutdown& self, py::object timeout) { self.get(seconds_option("timeout", timeout)); },
          py::arg("timeout") = py::none(),
          "Wait until the context has exited (TimeoutError after `timeout` seconds); returns None.")
      .def("ready", &py_shutdown::ready, "True once the context has exited.")
      .def("__repr__", [](const py_shutdown& self) { return "ShutdownLatch(" + self.name + ")"; });

  py::class_<py_receiver>(m, "Receiver", py::dynamic_attr(), "The pending result of call_async().")
      .def(
          "get",
          [](py_receiver& self, py::object timeout_o) {
            auto timeout = seconds_option("timeout", timeout_o);
            if (!self.reply) self.reply = wait_message(*self.rx, timeout);
            return result_of(self.owner, *self.reply);
          },
          py::arg("timeout") = py::none(),
          "Wait for the call's result and return it (raising CallError, ChannelError, or TimeoutError when "
          "`timeout` seconds pass first). May be called again: it returns the same result.")
      .def(
          "ready",
          [](py_receiver& self) {
            if (!self.reply) self.reply = self.rx->try_get();
            return self.reply.has_value();
          },
          "True once the result has arrived (get() will not block).")
      .def_property_readonly("context", [](const py_receiver& self) { return make_context(self.owner.ctx, self.owner.router); })
      .def_property_readonly("handle", [](const py_receiver& self) { return self.rx->handle(); });

  auto context_cls = py::class_<py_context>(m, "Context", py::dynamic_attr(),
                                           "A context (a Python program under this one's control) and the calls into it.");
  context_cls
      .def(py::init([](py::object router, std::uint32_t id, std::optional<std::string> name) {
             if (!py::isinstance<py_router>(router)) throw py::type_error("Context(router, ...): not a Router");
             auto& pr = router.cast<py_router&>();
             return py_context{mitogen::context(pr.r, id, name ? *name : pr.r->name_of(id)), router};
           }),
           py::arg("router"), py::arg("context_id"), py::arg("name") = py::none())
      .def_property_readonly("context_id", [](const py_context& c) { return c.ctx.id(); })
      .def_property_readonly("name", [](const py_context& c) { return c.ctx.name(); })
      .def_property_readonly("router", [](const py_context& c) { return c.router; })
      .def(
          "call_async",
          [](const py_context& c, const py::args& args, const py::kwargs& kw) {
            mitogen::call_spec spec = make_spec(args, kw, "call_async", c);
            std::shared_ptr<mitogen::receiver> rx;
            {
              nogil g;
              rx = c.ctx.call_async(std::move(spec));
            }
            return py_receiver{std::move(rx), c, std::nullopt};
          },
          "call_async(fn, *args, **kwargs): start the call and return a Receiver whose get() gives the result.")
      .def(
          "call_no_reply",
          [](const py_context& c, const py::args& args, const py::kwargs& kw) {
            mitogen::call_spec spec = make_spec(args, kw, "call_no_reply", c);
            nogil g;
            c.ctx.call_no_reply(std::move(spec));
          },
          "call_no_reply(fn, *args, **kwargs): start the call; no result comes back, failures are logged "
          "by the context.")
      .def(
          "shutdown",
          [](const py_context& c, py::object wait_o, py::object timeout_o) {
            bool wait = option("as_bool", "wait", wait_o).cast<bool>();
            auto timeout = seconds_option("timeout", timeout_o);
            {
              nogil g;
              c.ctx.shutdown(false);
            }
            py_shutdown done{c.ctx.get_router(), c.ctx.id(), c.ctx.name()};
            if (wait) done.get(timeout);
            return done;
          },
          py::arg("wait") = false, py::arg("timeout") = py::none(),
          "Ask the context to exit once its current call ends, and return an object whose get(timeout=None) "
          "waits until it has (upstream returns a Latch). With wait=True, wait here first (`timeout` "
          "seconds at most: TimeoutError).")
      .def_property_readonly(
          "remote_name",
          [](const py_context& c) -> py::object {
            auto& pr = c.router.cast<py_router&>();
            auto it = pr.remote_names.find(c.ctx.id());
            if (it == pr.remote_names.end()) return py::none();
            return py::str(it->second);
          },
          "The title the context was started with (its argv[0] is mitogen:<remote_name>), or None for a "
          "context this router did not start itself.")
      .def("__repr__", &repr)
      .def("__eq__",
           [](const py_context& a, py::object other) {
             if (!py::isinstance<py_context>(other)) return false;
             const auto& b = other.cast<const py_context&>();
             return a.ctx.id() == b.ctx.id() && a.ctx.get_router() == b.ctx.get_router();
           })
      .def("__hash__", [](const py_context& c) {
        return std::hash<std::uint32_t>()(c.ctx.id()) ^ std::hash<const void*>()(c.ctx.get_router().get());
      });
  // call, the hot path: a method descriptor of our own (fast_call).
  PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(context_cls.ptr()), &fast_call_def);
  if (!descr) throw py::error_already_set();
  context_cls.attr("call") = py::reinterpret_steal<py::object>(descr);
}

}  // namespace mitogen::python
