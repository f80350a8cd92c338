// C++ exceptions of the core -> the exception classes of mitogen_native.core.
#include <cstring>

#include "mitogen/context/errors.hpp"
#include "bindings.hpp"

namespace mitogen::python {
namespace {

void raise(const py::object& cls, const std::string& text, PyObject* fallback) {
  // The core's texts may carry a peer's bytes: never let bad UTF-8 hide the error.
  py::object msg = py::reinterpret_steal<py::object>(
      PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace"));
  PyErr_SetObject(cls ? cls.ptr() : fallback, msg.ptr());
}

/// Raise the StreamError subclass for `e`'s code (mitogen_native._wire._stream_error),
/// with `code` set; plain StreamError if that cannot be built. GIL held.
void raise_stream_error(const mitogen::stream_error& e, PyObject* fallback) {
  const char* name = mitogen::error_name(e.code());
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
