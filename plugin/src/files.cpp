// File transfer: Context.put_file / get_file / copy_file over the core's
// file_service (docs/files.md). The transfer runs on a helper thread without the
// GIL; the caller waits in slices, so Ctrl-C (KeyboardInterrupt) cancels it: the
// helper stops at its next wait, the remote end is told to give up and the
// destination is left as it was.
#include <thread>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

std::optional<std::string> id_text(const py::object& v, const char* what) {
  if (v.is_none()) return std::nullopt;
  if (py::isinstance<py::bool_>(v)) throw py::type_error(std::string(what) + " must be a name or an int");
  if (py::isinstance<py::int_>(v)) {
    auto n = v.cast<long long>();
    if (n < 0) throw py::value_error(std::string(what) + " must not be negative");
    return std::to_string(n);
  }
  if (py::isinstance<py::str>(v)) return v.cast<std::string>();
  throw py::type_error(std::string(what) + " must be a name or an int");
}

std::string path_text(const py::object& p) {
  return py::module_::import("os").attr("fsdecode")(p).cast<std::string>();
}

/// A size option: None, or an int (or numeric string) of at least 1.
std::optional<std::size_t> size_option(const char* name, const py::object& v) {
  py::object n = option("as_int", name, v);
  if (n.is_none()) return std::nullopt;
  auto x = n.cast<long long>();
  if (x < 1) throw py::value_error(std::string(name) + " must be at least 1");
  return static_cast<std::size_t>(x);
}

mitogen::file_options make_options(const py::object& mode, const py::object& owner, const py::object& group,
                                   const py::object& chunk_size, const py::object& window,
                                   const py::object& timeout) {
  mitogen::file_options o;
  if (py::object mv = option("as_mode", "mode", mode); !mv.is_none()) {
    auto m = mv.cast<long long>();
    if (m < 0 || m > 07777) throw py::value_error("mode must be between 0 and 0o7777");
    o.mode = static_cast<std::uint32_t>(m);
  }
  o.owner = id_text(owner, "owner");
  o.group = id_text(group, "group");
  if (auto n = size_option("chunk_size", chunk_size)) o.chunk_size = *n;
  if (auto n = size_option("window", window)) o.window = *n;
  if (auto t = seconds_option("timeout", timeout)) {
    if (!(*t > 0)) throw py::value_error("timeout must be positive");
    o.idle_timeout = std::chrono::milliseconds(static_cast<long long>(*t * 1000));
  }
  return o;
}

/// Run `fn(options)` on a helper thread; wait for it with signals honoured.
std::uint64_t run_transfer(mitogen::file_options opts,
                           std::function<std::uint64_t(const mitogen::file_options&)> fn) {
  auto cancel = std::make_shared<std::atomic<bool>>(false);
  auto done = std::make_shared<std::atomic<bool>>(false);
  opts.cancel = cancel.get();
  std::uint64_t result = 0;
  std::exception_ptr failure;
  std::mutex mu;
  std::condition_variable cv;
  std::thread worker([&, cancel, done] {
    try {
      result = fn(opts);
    } catch (...) {
      failure = std::current_exception();
    }
    std::lock_guard lk(mu);
    done->store(true);
    cv.notify_all();
  });
  try {
    wait_until(
        [&](std::chrono::milliseconds slice) {
          std::unique_lock lk(mu);
          return cv.wait_for(lk, slice, [&] { return done->load(); });
        },
        std::nullopt);
  } catch (...) {
    // KeyboardInterrupt (or any exception from a signal handler): stop the transfer.
    cancel->store(true);
    {
      nogil g;
      worker.join();
    }
    throw;
  }
  {
    nogil g;
    worker.join();
  }
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const mitogen::file_error& e) {
      py::object cls = py::module_::import("mitogen_native.core").attr("FileError");
      py::object msg = py::reinterpret_steal<py::object>(
          PyUnicode_DecodeUTF8(e.what(), static_cast<Py_ssize_t>(std::strlen(e.what())), "replace"));
      PyErr_SetObject(cls.ptr(), py::make_tuple(e.error_number(), msg).ptr());
      throw py::error_already_set();
    }
  }
  return result;
}

const py_context& as_context(const py::object& o) {
  if (!py::isinstance<py_context>(o)) throw py::type_error("expected a Context");
  return o.cast<const py_context&>();
}

}  // namespace

void register_files(py::module_& m) {
  auto cls = py::reinterpret_borrow<py::class_<py_context>>(m.attr("Context"));
  const char* common =
      " `mode` (default: the source's permission bits), `owner` and `group` (names or ids; default: "
      "the writer's) apply to the destination. `chunk_size` (bytes, default 1 MiB) and `window` (chunks in "
      "flight, default 8) bound memory; `timeout` (seconds, default 60) is how long the other end may show "
      "no progress. Returns the number of bytes copied. Raises FileError (an OSError: errno ENOSPC, "
      "EACCES, ...) and leaves the destination as it was on any failure.";
  cls.def(
         "put_file",
         [](const py_context& c, py::object local_path, py::object remote_path, py::object mode, py::object owner,
            py::object group, py::object chunk_size, py::object window, py::object timeout) {
           auto opts = make_options(mode, owner, group, chunk_size, window, timeout);
           auto local = path_text(local_path), remote = path_text(remote_path);
           auto ctx = c.ctx;
           return run_transfer(opts, [=](const mitogen::file_options& o) {
             return mitogen::send_file(ctx, local, remote, o);
           });
         },
         py::arg("local_path"), py::arg("remote_path"), py::arg("mode") = py::none(), py::arg("owner") = py::none(),
         py::arg("group") = py::none(), py::arg("chunk_size") = py::none(), py::arg("window") = py::none(),
         py::arg("timeout") = py::none(),
         (std::string("put_file(local_path, remote_path, ...): copy a file of this process to the context, "
                      "written under a temporary name and renamed into place once complete.") +
          common)
             .c_str())
      .def(
          "get_file",
          [](const py_context& c, py::object remote_path, py::object local_path, py::object mode, py::object owner,
             py::object group, py::object chunk_size, py::object window, py::object timeout) {
            auto opts = make_options(mode, owner, group, chunk_size, window, timeout);
            auto local = path_text(local_path), remote = path_text(remote_path);
            auto ctx = c.ctx;
            return run_transfer(opts, [=](const mitogen::file_options& o) {
              return mitogen::fetch_file(ctx, remote, local, o);
            });
          },
          py::arg("remote_path"), py::arg("local_path"), py::arg("mode") = py::none(),
          py::arg("owner") = py::none(), py::arg("group") = py::none(), py::arg("chunk_size") = py::none(),
          py::arg("window") = py::none(), py::arg("timeout") = py::none(),
          (std::string("get_file(remote_path, local_path, ...): copy a file of the context to this process, "
                       "written under a temporary name and renamed into place once complete.") +
           common)
              .c_str())
      .def(
          "copy_file",
          [](const py_context& c, py::object path, py::object dst, py::object dst_path, py::object mode,
             py::object owner, py::object group, py::object chunk_size,
             py::object window, py::object timeout) {
            auto opts = make_options(mode, owner, group, chunk_size, window, timeout);
            auto src_path = path_text(path), to = path_text(dst_path);
            auto src = c.ctx;
            auto dst_ctx = as_context(dst).ctx;
            return run_transfer(opts, [=](const mitogen::file_options& o) {
              return mitogen::copy_file(src, src_path, dst_ctx, to, o);
            });
          },
          py::arg("path"), py::arg("dst_context"), py::arg("dst_path"), py::arg("mode") = py::none(),
          py::arg("owner") = py::none(), py::arg("group") = py::none(), py::arg("chunk_size") = py::none(),
          py::arg("window") = py::none(), py::arg("timeout") = py::none(),
          (std::string("copy_file(path, dst_context, dst_path, ...): copy a file of this context to another "
                       "context, streamed through this process (nothing is written here).") +
           common)
              .c_str());
}

}  // namespace mitogen::python
