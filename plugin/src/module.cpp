// The extension module mitogen_native._native. Registration only: each area of the
// API binds itself in its own file (see bindings.hpp).
#include <malloc.h>

#include <cstdlib>

#include "bindings.hpp"

namespace mitogen::python {
void register_modules(py::module_& m);  // modules.cpp: the live module responder
}  // namespace mitogen::python

namespace {

/// Messages of a MiB or more are copied a few times on their way (Python object,
/// wire value, frame). glibc serves such blocks with fresh mmap()s and trims the heap
/// on free, so every copy pays a page fault per 4 KiB: 1 MiB round trips cost ~4 ms
/// instead of ~0.4 ms on the reference machine. Keeping blocks below 32 MiB on the
/// heap, and up to 64 MiB of free heap before returning it to the kernel, removes
/// that. Process-wide, so it can be turned off: MITOGEN_NATIVE_MALLOC_TUNING=0.
void tune_malloc() {
  const char* opt = std::getenv("MITOGEN_NATIVE_MALLOC_TUNING");
  if (opt && opt[0] == '0') return;
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
}

}  // namespace

namespace mitogen::python {
void register_mux(py::module_& m);  // mux.cpp: the client of the mitogen-mux daemon
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "C++ core of mitogen_native; use the mitogen_native package, not this module.";
  using namespace mitogen::python;
  tune_malloc();
  register_errors(m);
  register_convert(m);
  register_logging(m);
  register_broker(m);
  register_router(m);
  register_context(m);
  register_files(m);
  register_channels(m);
  register_modules(m);
  register_mux(m);
}
