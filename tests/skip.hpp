#pragma once
// Skipping a Catch2 case that cannot run here (no root for the loopback sshd or the
// become users, a package missing), so that ctest reports it as skipped, not passed.
//
// MITOGEN_SKIP(why) warns, records the case and returns from it. The shared main
// (catch_main.cpp) then exits with skip_exit_code if nothing failed; a program that
// may skip is registered with the ctest property SKIP_RETURN_CODE 77 (one without it
// shows a skip as a failure: loud, never a silent pass). Where every case must run
// (CI, as root), MITOGEN_NO_SKIP=1 in the environment turns a skip into a failure.
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

namespace mitogen::test {

constexpr int skip_exit_code = 77;

struct skip_record {
  std::mutex mu;
  std::vector<std::string> cases;  ///< "case name: reason"
};

inline skip_record& skips() {
  static skip_record r;
  return r;
}

inline bool skipping_forbidden() {
  const char* v = std::getenv("MITOGEN_NO_SKIP");
  return v && *v && std::string(v) != "0";
}

inline void note_skip(const std::string& why) {
  std::lock_guard lk(skips().mu);
  skips().cases.push_back(Catch::getResultCapture().getCurrentTestName() + ": " + why);
}

}  // namespace mitogen::test

/// Skip the current test case (from its body, not from a helper): see above.
#define MITOGEN_SKIP(why)                                                 \
  do {                                                                    \
    if (::mitogen::test::skipping_forbidden()) FAIL("cannot run (MITOGEN_NO_SKIP is set): " << why); \
    WARN("skipped: " << why);                                             \
    ::mitogen::test::note_skip(why);                                      \
    return;                                                               \
  } while (0)
