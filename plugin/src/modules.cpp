// The Python API's module responder: GET_MODULE resolved against the live program
// (docs/protocol.md, "Modules"). The core's worker thread calls a Python resolver
// (mitogen_native.master._resolve_module) with the GIL taken there, never on the
// broker thread.
#include <condition_variable>
#include <mutex>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

/// One responder's Python resolver, called from the responder's worker thread.
/// stop() (at exit: atexit runs before the interpreter finalizes) waits for a call
/// in progress and makes later ones answer "not found" without touching Python: a
/// C++ thread taking the GIL during finalization would be killed by CPython inside
/// our frames.
struct py_resolver {
  std::mutex mu;
  std::condition_variable cv;
  bool enabled = true;  // guarded by mu
  int in_flight = 0;    // guarded by mu
  py::object fn;        // GIL held to touch

  std::optional<mitogen::module_source> operator()(const std::string& fullname) {
    {
      std::lock_guard lk(mu);
      if (!enabled) return std::nullopt;
      ++in_flight;
    }
    struct leave {
      py_resolver& r;
      ~leave() {
        std::lock_guard lk(r.mu);
        --r.in_flight;
        r.cv.notify_all();
      }
    } guard{*this};
    py::gil_scoped_acquire gil;
    try {
      py::object res = fn(fullname);
      if (res.is_none()) return std::nullopt;
      auto t = res.cast<py::tuple>();
      if (t.size() != 4) throw std::runtime_error("the resolver must return None or a 4-tuple");
      mitogen::module_source s;
      s.path = t[0].cast<std::string>();
      if (!t[1].is_none()) s.source = t[1].cast<std::string>();  // bytes, or str as UTF-8
      s.is_package = t[2].cast<bool>();
      if (!t[3].is_none()) s.submodules = t[3].cast<std::vector<std::string>>();
      return s;
    } catch (py::error_already_set& e) {
      // Keep only the text: the Python exception must not outlive the GIL.
      std::string what = e.what();
      throw std::runtime_error(what);
    }
  }

  /// Disable, waiting for a call in progress. GIL held or not.
  void stop() {
    {
      std::lock_guard lk(mu);
      enabled = false;
      if (in_flight == 0) return;
    }
    // The call in progress may be waiting for the GIL we hold. `mu` is never held
    // while the GIL is wanted (declared after `released`, it is let go first).
    std::optional<nogil> released;
    if (PyGILState_Check()) released.emplace();
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return in_flight == 0; });
  }
};

std::mutex resolvers_mu;
std::vector<std::weak_ptr<py_resolver>> resolvers;  // every live resolver, for _stop_module_resolvers()

/// What Router.responder holds: destroying it releases the GIL while the core
/// responder joins its worker (which may be waiting for the GIL inside the
/// resolver), then drops the Python function with the GIL held again.
struct live_responder {
  std::shared_ptr<mitogen::module_responder> core;
  std::shared_ptr<py_resolver> resolver;
  ~live_responder() {
    resolver->stop();
    {
      std::optional<nogil> released;
      if (PyGILState_Check()) released.emplace();
      core.reset();
    }
    if (PyGILState_Check()) {
      resolver->fn = py::object();
    } else {
      resolver->fn.release();  // no GIL here: leak rather than crash
    }
  }
};

}  // namespace

void register_modules(py::module_& m) {
  m.def(
      "_serve_modules_live",
      [](py_router& router, py::function resolver, std::optional<std::string> main_script,
         std::vector<std::string> allow, std::vector<std::string> deny, std::vector<std::string> excluded) {
        {
          // One responder per router: the old one must unregister before the new
          // one registers. Its worker may need the GIL to finish.
          auto old = std::move(router.responder);
          nogil g;
          old.reset();
        }
        auto res = std::make_shared<py_resolver>();
        res->fn = std::move(resolver);
        {
          std::lock_guard lk(resolvers_mu);
          std::erase_if(resolvers, [](const auto& w) { return w.expired(); });
          resolvers.push_back(res);
        }
        auto holder = std::make_shared<live_responder>();
        holder->resolver = res;
        holder->core = mitogen::module_responder::create(
            router.r, {.resolver = [res](const std::string& name) { return (*res)(name); },
                       .main_script = std::move(main_script),
                       .allow = std::move(allow),
                       .deny = std::move(deny),
                       .excluded = std::move(excluded)});
        router.responder = std::shared_ptr<mitogen::module_responder>(holder, holder->core.get());
      },
      py::arg("router"), py::arg("resolver"), py::arg("main_script"), py::arg("allow"), py::arg("deny"),
      py::arg("excluded"),
      "Answer the contexts of `router` with modules found by `resolver(fullname)` at request time: None, or "
      "(path, source bytes or None to read `path`, is_package, submodule names). Called on the responder's "
      "worker thread with the GIL (see mitogen_native.master._resolve_module). Top-level names in `excluded` "
      "are never served nor looked up.");
  m.def(
      "_stop_module_resolvers",
      [] {
        std::vector<std::shared_ptr<py_resolver>> all;
        {
          std::lock_guard lk(resolvers_mu);
          for (auto& w : resolvers)
            if (auto r = w.lock()) all.push_back(std::move(r));
        }
        for (auto& r : all) r->stop();
      },
      "Stop every module resolver (at exit, before the interpreter finalizes): requests are then answered "
      "'not found' without calling Python.");
}

}  // namespace mitogen::python
