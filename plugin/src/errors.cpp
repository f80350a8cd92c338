// C++ exceptions of the core -> the exception classes of mitogen_native.core.
#include <cstring>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

void raise(const py::object& cls, const std::string& text, PyObject* fallback) {
  // The core's texts may carry a peer's bytes: never let bad UTF-8 hide the error.
  py::object msg = py::reinterpret_steal<py::object>(
      PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace"));
  PyErr_SetObject(cls ? cls.ptr() : fallback, msg.ptr());
}

/// The name of a core error code, as StreamError.code carries it.
const char* code_name(const std::error_code& ec) {
  if (ec.category() != mitogen::mitogen_category()) return nullptr;
  switch (static_cast<mitogen::errc>(ec.value())) {
    case mitogen::errc::child_died: return "child_died";
    case mitogen::errc::connect_timeout: return "connect_timeout";
    case mitogen::errc::spawn_failed: return "spawn_failed";
    case mitogen::errc::bootstrap_failed: return "bootstrap_failed";
    case mitogen::errc::protocol_error: return "protocol_error";
    case mitogen::errc::broker_shut_down: return "broker_shut_down";
    case mitogen::errc::no_route: return "no_route";
    case mitogen::errc::timed_out: return "timed_out";
    case mitogen::errc::auth_failed: return "auth_failed";
    case mitogen::errc::host_key_mismatch: return "host_key_mismatch";
    case mitogen::errc::host_key_unknown: return "host_key_unknown";
    case mitogen::errc::host_unreachable: return "host_unreachable";
    case mitogen::errc::become_password_wrong: return "become_password_wrong";
    case mitogen::errc::become_password_required: return "become_password_required";
    case mitogen::errc::become_not_allowed: return "become_not_allowed";
  }
  return nullptr;
}

/// Raise the StreamError subclass for `e`'s code (mitogen_native._wire._stream_error),
/// with `code` set; plain StreamError if that cannot be built. GIL held.
void raise_stream_error(const mitogen::stream_error& e, PyObject* fallback) {
  const char* name = code_name(e.code());
  try {
    auto make = py::module_::import("mitogen_native._wire").attr("_stream_error");
    py::object msg = py::reinterpret_steal<py::object>(
        PyUnicode_DecodeUTF8(e.what(), static_cast<Py_ssize_t>(std::strlen(e.what())), "replace"));
    py::object exc = make(name ? py::object(py::str(name)) : py::object(py::none()), msg);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    return;
  } catch (const py::error_already_set&) {
    PyErr_Clear();
  }
  raise(types().StreamError, e.what(), fallback);
}

}  // namespace

void register_errors(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    auto& t = types();
    try {
      std::rethrow_exception(p);
    } catch (const mitogen::call_error& e) {
      raise(t.CallError, e.text(), PyExc_RuntimeError);
    } catch (const mitogen::channel_error& e) {
      raise(t.ChannelError, e.what(), PyExc_RuntimeError);
    } catch (const mitogen::stream_error& e) {
      // Upstream's subclasses (EofError, HostKeyError, PasswordError, ...) and
      // the core's error code as `code`.
      raise_stream_error(e, PyExc_RuntimeError);
    } catch (const mitogen::timeout_error& e) {
      raise(t.TimeoutError, e.what(), PyExc_TimeoutError);
    } catch (const mitogen::error& e) {
      raise(t.Error, e.what(), PyExc_RuntimeError);
    }
  });
}

}  // namespace mitogen::python
