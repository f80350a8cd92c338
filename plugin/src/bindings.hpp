#pragma once
/// Shared declarations of the extension's translation units. Each area of the API
/// binds itself in its own file; module.cpp only calls the register_*() functions.
///
/// Threading rule: Python objects (py::object, PyObject*) live only in the types
/// below and are only touched by Python threads holding the GIL. The broker thread
/// sees C++ values (wire::value, std::string) and nothing else.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "mitogen/mitogen.hpp"

namespace py = pybind11;

namespace mitogen::python {

/// Python's Broker: owns one broker (one I/O thread).
struct py_broker {
  std::shared_ptr<mitogen::broker> b;
  std::atomic<bool> stopping{false};
  /// Broker.shutdown(): the core's graceful shutdown (each router asks its contexts
  /// to exit and reads their last output for router::shutdown_grace). Never blocks.
  void shutdown();
  ~py_broker();
};

/// Python's Router. `broker` is the Python Broker object, kept so router.broker is
/// the very object the user passed.
struct py_router {
  std::shared_ptr<mitogen::router> r;
  py::object broker;
  bool debug = false;  ///< default of local(debug=...), set by enable_debug()
  /// Serves the controller's modules to this router's contexts (GET_MODULE).
  std::shared_ptr<mitogen::module_responder> responder;
  /// The argv title (remote_name) each context started through this router was
  /// given, for Context.remote_name. GIL held.
  std::unordered_map<std::uint32_t, std::string> remote_names;
};

/// Python's Context: a core context plus the Python Router it belongs to, which is
/// where contexts decoded from replies are bound.
struct py_context {
  mitogen::context ctx;
  py::object router;
};

/// Python's Receiver (call_async's result). Keeps the reply once received, so
/// get() can be repeated.
struct py_receiver {
  std::shared_ptr<mitogen::receiver> rx;
  py_context owner;
  std::optional<wire::message> reply;
};

/// Python classes defined in mitogen_native/core.py that the conversions and the
/// exception translator need. Filled by core.py through _native._register_types().
struct wire_types {
  py::object Kwargs, Blob, Secret, CallError, Sender, DEAD;
  py::object Error, ChannelError, StreamError, TimeoutError;
};
wire_types& types();

// ---- options (convert.cpp)

/// An option of an API method checked and converted by mitogen_native._options
/// (`fn`: "as_int", "as_float", "as_mode", ...): accepts what upstream accepts
/// (numeric strings for numbers), otherwise raises TypeError naming `name` and
/// the type expected. Returns None for None. GIL held.
py::object option(const char* fn, const char* name, const py::object& v);
/// option("as_float", name, v) as seconds, or nullopt for None. GIL held.
std::optional<double> seconds_option(const char* name, const py::object& v);

// ---- conversions (convert.cpp)

/// Python -> wire. Raises TypeError naming the refused value's type and where it
/// sits, e.g. "cannot send value of type set at args[1]['k']". GIL held.
wire::value to_wire(py::handle o, const char* root);
/// Positional arguments args[first:] as a wire tuple. GIL held.
wire::tuple args_to_wire(const py::args& args, std::size_t first);
/// The `n` positional arguments at `items` (a vectorcall's) as a wire tuple. GIL held.
wire::tuple args_to_wire(PyObject* const* items, std::size_t n);
/// Keyword arguments as Kwargs. GIL held.
wire::kwargs kwargs_to_wire(const py::kwargs& kw);
/// A vectorcall's keyword arguments (names in `kwnames`, a tuple or null; values at
/// `values`) as Kwargs. GIL held.
wire::kwargs kwargs_to_wire(PyObject* kwnames, PyObject* const* values);
/// wire -> Python; contexts in `v` are bound to `router` (a Python Router). GIL held.
py::object from_wire(wire::value&& v, const py::object& router);

// ---- channels (channel.cpp)

/// Called by to_wire() for each Sender it converts. If a grant_scope is open on this
/// thread, the scope remembers it: a Sender of one of our own channel receivers, or
/// of another context's handle (forwarding permission in unidirectional mode). GIL held.
void note_sender(const mitogen::context& target, std::uint32_t handle);

/// Collects the Senders converted while it is open (on this thread); apply() lets
/// the context the converted value goes to send to their handles. Open one around
/// the conversion of anything sent to a context, and apply() before sending it.
class grant_scope {
 public:
  grant_scope();
  ~grant_scope();
  grant_scope(const grant_scope&) = delete;
  grant_scope& operator=(const grant_scope&) = delete;
  void apply(std::uint32_t dst_context);

 private:
  friend void note_sender(const mitogen::context&, std::uint32_t);
  struct note {
    std::shared_ptr<mitogen::router> r;
    std::uint32_t target;  ///< the context the Sender sends to
    std::uint32_t handle;
  };
  grant_scope* prev_;
  std::vector<note> notes_;
};

// ---- GIL and waiting (gil.cpp)

/// Releases the GIL for its lifetime, like py::gil_scoped_release, except that a
/// thread waking up after the interpreter began finalizing parks for good instead
/// of being killed inside a C++ destructor (which would std::terminate the process).
class nogil {
 public:
  nogil();
  ~nogil();
  nogil(const nogil&) = delete;
  nogil& operator=(const nogil&) = delete;

 private:
  PyThreadState* ts_;
};

/// How often a blocked caller wakes to let Python run signal handlers (Ctrl-C).
inline constexpr std::chrono::milliseconds signal_poll{50};

/// Wait for the next message on `rx` without the GIL, waking every signal_poll to
/// run Python's signal handlers (KeyboardInterrupt propagates). `timeout_s` bounds
/// the wait (mitogen::timeout_error). GIL held on entry and exit.
wire::message wait_message(receiver& rx, std::optional<double> timeout_s);
/// Poll `done` (called without the GIL, with the time it may block) until it
/// returns true, running signal handlers between slices. Returns false on timeout.
bool wait_until(const std::function<bool(std::chrono::milliseconds)>& done, std::optional<double> timeout_s);

// ---- log records (log_queue.cpp)

/// Queue a record forwarded by a context. Any thread (the broker's, typically).
void push_context_log(std::uint32_t context_id, const std::string& context_name, const std::string& logger,
                      int level, const std::string& text);

// ---- registration, one per file
void register_errors(py::module_& m);
void register_convert(py::module_& m);
void register_logging(py::module_& m);
void register_broker(py::module_& m);
void register_router(py::module_& m);
void register_context(py::module_& m);
void register_files(py::module_& m);  ///< after register_context: adds Context methods
void register_channels(py::module_& m);

/// Build a Python Context for `ctx`, bound to `router`. GIL held.
py::object make_context(mitogen::context ctx, const py::object& router);

}  // namespace mitogen::python
