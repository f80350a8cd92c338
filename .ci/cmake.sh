# Sourced by .ci/setup, .ci/sanitize and .ci/fuzz: how CI configures a tree
# (docs/fuzzing.md, "CI time").
#
# ci_configure DIR CMAKE-ARGS...: a unity build (CMAKE_UNITY_BUILD: each target's
# sources compiled as batches of up to 8 in one translation unit, so Boost.Asio,
# spdlog, pybind11 and the standard library are parsed and their inline code compiled
# once per batch rather than once per file) with Ninja (a test program's objects
# compile while the libraries below it are still building; Make waits for them). A
# tree configured before keeps its generator: CMake cannot change it in place.
ci_configure() {
  local dir=$1
  shift
  local generator=()
  [ -e "$dir/CMakeCache.txt" ] || generator=(-G Ninja)
  cmake -S . -B "$dir" "${generator[@]}" -DCMAKE_UNITY_BUILD=ON "$@" >/dev/null
}
