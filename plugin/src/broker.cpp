// Broker: the I/O thread, its orderly shutdown, and the registry the interpreter's
// exit uses to shut down every broker the program forgot, so that no process
// outlives its controller.
#include <thread>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

std::mutex registry_mu;
std::vector<std::weak_ptr<py_broker>>& registry() {
  static auto* r = new std::vector<std::weak_ptr<py_broker>>();  // leaked, see types()
  return *r;
}

void remember(const std::shared_ptr<py_broker>& b) {
  std::lock_guard lk(registry_mu);
  auto& r = registry();
  std::erase_if(r, [](auto& w) { return w.expired(); });
  r.push_back(b);
}

std::vector<std::shared_ptr<py_broker>> live_brokers() {
  std::lock_guard lk(registry_mu);
  std::vector<std::shared_ptr<py_broker>> out;
  for (auto& w : registry())
    if (auto b = w.lock()) out.push_back(std::move(b));
  return out;
}

/// Wait (interruptibly) until the core broker is stopping, then join its thread.
void join(py_broker& pb, std::optional<double> timeout_s) {
  // Upstream's join() waits for somebody to call shutdown(); so does ours. The
  // thread can only be joined once the core broker has begun stopping.
  auto& b = *pb.b;
  bool stopping = wait_until(
      [&](std::chrono::milliseconds slice) {
        auto until = std::chrono::steady_clock::now() + slice;
        while (!b.shutting_down() && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
        return b.shutting_down();
      },
      timeout_s);
  if (!stopping) throw mitogen::timeout_error("broker was not shut down within the timeout");
  nogil g;
  b.join();  // bounded by broker::shutdown_grace
}

}  // namespace

void py_broker::shutdown() {
  if (stopping.exchange(true)) return;
  b->shutdown();
}

py_broker::~py_broker() {
  // Dropping the last reference joins the I/O thread: do that without the GIL.
  if (b && b.use_count() == 1) {
    nogil g;
    b.reset();
  }
}

void register_broker(py::module_& m) {
  py::class_<py_broker, std::shared_ptr<py_broker>>(m, "Broker", py::dynamic_attr(),
                                                    "Runs the private I/O thread shared by its routers.")
      .def(py::init([] {
             auto pb = std::make_shared<py_broker>();
             pb->b = std::make_shared<mitogen::broker>();
             remember(pb);
             return pb;
           }),
           "Start the broker thread.")
      .def("shutdown", &py_broker::shutdown,
           "Begin an orderly shutdown: every context of every router on this broker is asked to exit, and "
           "once they have (or after half a second) their streams close and every waiting call is released. "
           "Does not block; follow with join().")
      .def(
          "join", [](py_broker& self, py::object timeout) { join(self, seconds_option("timeout", timeout)); },
          py::arg("timeout") = py::none(), "Wait until the broker thread has finished (after shutdown()).")
      .def_property_readonly(
          "shutting_down", [](py_broker& self) { return self.stopping.load() || self.b->shutting_down(); },
          "True once shutdown() has been called.");

  m.def(
      "_shutdown_all",
      [] {
        auto all = live_brokers();
        for (auto& pb : all) pb->shutdown();
        for (auto& pb : all) join(*pb, std::nullopt);
        return all.size();
      },
      "Shut down and join every broker still alive (run at interpreter exit).");
}

}  // namespace mitogen::python
