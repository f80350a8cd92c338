// Releasing the GIL around blocking waits, and keeping Ctrl-C working while blocked.
#include <unistd.h>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

[[noreturn]] void park_forever() {
  // The interpreter is going away under a daemon thread: taking the GIL now would
  // make CPython end this thread by unwinding it from inside our destructor, which
  // C++ turns into std::terminate. Sleeping until the process exits is harmless.
  for (;;) ::pause();
}

}  // namespace

nogil::nogil() {
  // While finalizing, only the finalizing thread holds the GIL: that is us, and we
  // must keep it (releasing would let nobody back in, including ourselves).
  ts_ = finalizing() ? nullptr : PyEval_SaveThread();
}

nogil::~nogil() {
  if (!ts_) return;
  if (finalizing()) park_forever();
  PyEval_RestoreThread(ts_);
}

bool wait_until(const std::function<bool(std::chrono::milliseconds)>& done, std::optional<double> timeout_s) {
  using clock = std::chrono::steady_clock;
  const auto deadline = timeout_s ? clock::now() + std::chrono::duration_cast<clock::duration>(
                                                       std::chrono::duration<double>(std::max(0.0, *timeout_s)))
                                  : clock::time_point::max();
  for (;;) {
    auto slice = signal_poll;
    if (timeout_s) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
      slice = std::clamp(left, std::chrono::milliseconds(0), signal_poll);
    }
    bool ok;
    {
      nogil g;
      ok = done(slice);
    }
    if (ok) return true;
    // Python's SIGINT handler only set a flag; run it here, in the waiting thread.
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (timeout_s && clock::now() >= deadline) return false;
  }
}

wire::message wait_message(receiver& rx, std::optional<double> timeout_s) {
  std::optional<wire::message> m;
  // The receiver's condition variable wakes us the moment the reply lands; the
  // slices only bound how late a signal handler may run.
  bool ok = wait_until(
      [&](std::chrono::milliseconds slice) {
        m = rx.get_for(slice);
        return m.has_value();
      },
      timeout_s);
  if (!ok) throw mitogen::timeout_error("no reply within " + std::to_string(*timeout_s) + " s");
  return std::move(*m);
}

}  // namespace mitogen::python
