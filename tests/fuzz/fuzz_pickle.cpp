// libFuzzer target: wire::decode and the decode→encode→decode round trip. See docs/fuzzing.md.
#include <cstdio>
#include <cstdlib>

#include "fuzz_checks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string failed = mitogen_fuzz::check_pickle({data, size});
  if (!failed.empty()) {
    std::fprintf(stderr, "fuzz_pickle: property violated: %s\n", failed.c_str());
    std::abort();
  }
  return 0;
}
