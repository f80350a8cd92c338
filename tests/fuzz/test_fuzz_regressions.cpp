// Replays the fuzz seed corpus and every input that once broke a property
// (regressions/<target>/, copied there from a fuzzer's crash-* artifacts) through the
// checks the fuzz targets make. Runs in every build, sanitizers or not.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz_checks.hpp"

namespace fs = std::filesystem;

namespace {

using check_fn = std::string (*)(std::span<const std::uint8_t>);

std::vector<fs::path> inputs(const std::string& target) {
  std::vector<fs::path> out;
  for (const char* dir : {"corpus", "regressions"}) {
    fs::path d = fs::path(FUZZ_DIR) / dir / target;
    if (!fs::is_directory(d)) continue;
    for (const auto& e : fs::directory_iterator(d))
      if (e.is_regular_file() && e.path().filename().string()[0] != '.') out.push_back(e.path());
  }
  return out;
}

void replay(const std::string& target, check_fn check) {
  auto files = inputs(target);
  CHECK_FALSE(files.empty());
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    INFO(f.string());
    CHECK(check({reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()}) == "");
  }
}

}  // namespace

TEST_CASE("frame parser corpus and regressions hold every property") {
  replay("frame", mitogen_fuzz::check_frame);
}

TEST_CASE("pickle decoder corpus and regressions hold every property") {
  replay("pickle", mitogen_fuzz::check_pickle);
}

TEST_CASE("marker scanner corpus and regressions hold every property") {
  replay("bootstrap", mitogen_fuzz::check_bootstrap);
}
