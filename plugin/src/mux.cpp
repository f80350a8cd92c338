// The client of the multiplexer daemon (mitogen-mux): _native._MuxClient, wrapped
// by mitogen_native/mux.py. An attachment is a broker and a client router of its
// own (core/include/mitogen/mux/client.hpp); the Contexts it hands out are ordinary
// Python Contexts bound to a Router object over that client router, so call(),
// call_async(), put_file()... work on them exactly as on master.Router's.
#include <unistd.h>

#include <system_error>

#include "bindings.hpp"
#include "mitogen/context/connection_stack.hpp"
#include "mitogen/mux/client.hpp"
#include "mitogen/mux/protocol.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen::python {
namespace {

/// One attachment to the daemon.
struct py_mux_client {
  std::shared_ptr<mitogen::mux::client> c;
  py::object router;  ///< _native.Router over c's client router
};

/// A Router object over the client's router, whose broker is the client's own (not
/// in the registry Python's exit uses: the client detaches itself).
py::object make_router(const std::shared_ptr<mitogen::mux::client>& c) {
  auto pb = std::make_shared<py_broker>();
  pb->b = c->get_broker();
  auto pr = std::make_shared<py_router>();
  pr->r = c->get_router();
  pr->broker = py::cast(pb);
  return py::cast(pr);
}

/// A forked child must not use its parent's attachment (its broker thread does not
/// exist here, its socket is the parent's).
void check_owner(const py_mux_client& self) {
  if (self.c->owner_pid() != ::getpid())
    throw py::value_error("this mitogen-mux attachment belongs to process " + std::to_string(self.c->owner_pid()) +
                          "; a forked child must attach anew (mitogen_native.mux does)");
  if (self.c->detached()) throw mitogen::channel_error("mitogen-mux: this attachment was detached");
}

/// Send a request and wait for its reply (interruptibly, without the GIL).
wire::message ask(py_mux_client& self, std::uint32_t handle, const wire::value& payload, std::optional<double> timeout) {
  check_owner(self);
  std::shared_ptr<mitogen::receiver> rx;
  {
    nogil g;
    rx = self.c->request(handle, wire::encode(payload));
  }
  return wait_message(*rx, timeout);
}

/// Run `fn`, turning a bad stack into ValueError (a programming error, not a
/// connection failure).
template <class F>
auto bad_stack_is_value_error(F fn) {
  try {
    return fn();
  } catch (const mitogen::stack_error& e) {
    throw py::value_error(e.what());
  }
}

py::object status_of(py_mux_client& self, std::optional<double> timeout) {
  auto m = ask(self, wire::MUX_STATUS, wire::none{}, timeout);
  return from_wire(mitogen::mux::decode_reply(m), self.router);
}

}  // namespace

void register_mux(py::module_& m) {
  py::class_<py_mux_client, std::shared_ptr<py_mux_client>>(
      m, "_MuxClient", "An attachment to the mitogen-mux daemon; use mitogen_native.mux.attach().")
      .def_static(
          "attach",
          [](const std::string& path, double timeout) {
            std::shared_ptr<mitogen::mux::client> c;
            try {
              nogil g;
              c = mitogen::mux::client::attach(path, std::chrono::milliseconds(static_cast<long>(timeout * 1000)));
            } catch (const std::system_error& e) {
              // OSError with its errno: the caller tells "no daemon" (ENOENT,
              // ECONNREFUSED) from the rest.
              // OSError(errno, text, filename) makes the errno's own subclass
              // (FileNotFoundError, ConnectionRefusedError...).
              py::object err = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.code().value(),
                                                                                std::string(e.what()), path);
              PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
              throw py::error_already_set();
            }
            auto pc = std::make_shared<py_mux_client>();
            pc->c = std::move(c);
            pc->router = make_router(pc->c);
            return pc;
          },
          py::arg("path"), py::arg("timeout") = 10.0,
          "Connect to the daemon's socket and read its greeting. OSError if nothing listens there.")
      .def_property_readonly("context_id", [](const py_mux_client& self) { return self.c->context_id(); })
      .def_property_readonly("daemon_pid", [](const py_mux_client& self) { return self.c->daemon_pid(); })
      .def_property_readonly("owner_pid", [](const py_mux_client& self) { return self.c->owner_pid(); })
      .def_property_readonly("router", [](const py_mux_client& self) { return self.router; })
      .def_property_readonly("detached", [](const py_mux_client& self) { return self.c->detached(); })
      .def_property_readonly(
          "connected", [](const py_mux_client& self) { return self.c->connected(); },
          "False once the daemon went away (or after detach()).")
      .def(
          "connect",
          [](py_mux_client& self, py::object stack, std::optional<double> timeout) {
            wire::value v = to_wire(stack, "stack");
            auto m = ask(self, wire::MUX_CONNECT, v, timeout);
            auto ctx = bad_stack_is_value_error([&] { return self.c->connected(m); });
            return make_context(std::move(ctx), self.router);
          },
          py::arg("stack"), py::arg("timeout") = py::none(),
          "MUX_CONNECT: the Context of this connection stack (a list of hop dicts), made or reused by the daemon.")
      .def(
          "reset",
          [](py_mux_client& self, py::object stack, std::optional<double> timeout) {
            wire::value v = to_wire(stack, "stack");
            auto m = ask(self, wire::MUX_RESET, v, timeout);
            auto r = bad_stack_is_value_error([&] { return mitogen::mux::decode_reply(m); });
            return r.is<std::int64_t>() ? r.as<std::int64_t>() : 0;
          },
          py::arg("stack"), py::arg("timeout") = py::none(),
          "MUX_RESET: shut down the context of this stack and those started through it; returns how many.")
      .def("status", &status_of, py::arg("timeout") = py::none(), "MUX_STATUS: the daemon's state as a dict.")
      .def(
          "stop",
          [](py_mux_client& self, std::optional<double> timeout) {
            auto m = ask(self, wire::MUX_STOP, wire::none{}, timeout);
            mitogen::mux::decode_reply(m);
          },
          py::arg("timeout") = py::none(), "MUX_STOP: ask the daemon to end (its contexts shut down).")
      .def(
          "detach",
          [](py_mux_client& self) {
            if (self.c->owner_pid() != ::getpid()) return self.c->abandon();
            nogil g;
            self.c->detach();
          },
          "Hang up on the daemon (its contexts go on). Idempotent.")
      .def(
          "abandon", [](py_mux_client& self) { self.c->abandon(); },
          "In a forked child: drop the parent's attachment without touching it.");
}

}  // namespace mitogen::python
