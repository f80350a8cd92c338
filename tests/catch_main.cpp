// The Catch2 main shared by every C++ test program. A program whose cases all passed
// but some skipped (MITOGEN_SKIP, skip.hpp) exits with skip_exit_code, which ctest
// reports as "Skipped" (SKIP_RETURN_CODE), so a case that could not run is never
// counted as passed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cstdio>

#include "skip.hpp"

int main(int argc, char* argv[]) {
  const int result = Catch::Session().run(argc, argv);
  auto& s = mitogen::test::skips();
  std::lock_guard lk(s.mu);
  if (result != 0 || s.cases.empty()) return result;
  std::fprintf(stderr, "%zu test case(s) skipped (reported to ctest as skipped):\n", s.cases.size());
  for (const auto& c : s.cases) std::fprintf(stderr, "  %s\n", c.c_str());
  return mitogen::test::skip_exit_code;
}
