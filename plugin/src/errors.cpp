// C++ exceptions of the core -> the exception classes of mitogen_native.core.
#include "bindings.hpp"

namespace mitogen::python {
namespace {

void raise(const py::object& cls, const std::string& text, PyObject* fallback) {
  // The core's texts may carry a peer's bytes: never let bad UTF-8 hide the error.
  py::object msg = py::reinterpret_steal<py::object>(
      PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace"));
  PyErr_SetObject(cls ? cls.ptr() : fallback, msg.ptr());
}

/// mitogen_native.core.PasswordError, or None if core.py lacks it. GIL held.
py::object password_error() {
  try {
    auto core = py::module_::import("mitogen_native.core");
    if (py::hasattr(core, "PasswordError")) return core.attr("PasswordError");
  } catch (const py::error_already_set&) {
  }
  return {};
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
      // sudo/su/doas refused or wanted the password: core.PasswordError, a
      // StreamError, as upstream's mitogen.sudo.PasswordError.
      if (e.code() == mitogen::errc::become_password_wrong || e.code() == mitogen::errc::become_password_required) {
        if (py::object cls = password_error(); cls) return raise(cls, e.what(), PyExc_RuntimeError);
      }
      raise(t.StreamError, e.what(), PyExc_RuntimeError);
    } catch (const mitogen::timeout_error& e) {
      raise(t.TimeoutError, e.what(), PyExc_TimeoutError);
    } catch (const mitogen::error& e) {
      raise(t.Error, e.what(), PyExc_RuntimeError);
    }
  });
}

}  // namespace mitogen::python
