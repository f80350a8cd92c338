// Cross-check with CPython both ways, at test time: CPython's pickles (protocols 2 and 3)
// decode to the expected values here, and our encodings load in CPython (through a
// restricted Unpickler, see wire_samples.py) as the expected Python values.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <unistd.h>

#include "wire_test_util.hpp"

using namespace mitogen::wire;
using namespace wire_test;

namespace {

/// Mirror of wire_samples.samples(): same names, same values.
std::vector<std::pair<std::string, value>> samples() {
  std::string b70k(70000, '\0');
  for (std::size_t i = 0; i < b70k.size(); ++i) b70k[i] = static_cast<char>(i % 256);
  std::vector<value> l2500;
  for (int i = 0; i < 2500; ++i) l2500.push_back(I(i));
  std::vector<std::pair<value, value>> d1500;
  for (int i = 0; i < 1500; ++i) d1500.emplace_back(I(i), S(std::to_string(i)));
  return {
      {"none", none{}},
      {"true", true},
      {"false", false},
      {"int0", I(0)},
      {"int255", I(255)},
      {"int256", I(256)},
      {"int65535", I(65535)},
      {"int65536", I(65536)},
      {"neg1", I(-1)},
      {"i32max", I(2147483647)},
      {"i32min", I(-2147483648LL)},
      {"i32max_plus1", I(2147483648LL)},
      {"i32min_minus1", I(-2147483649LL)},
      {"i64max", I(std::numeric_limits<std::int64_t>::max())},
      {"i64min", I(std::numeric_limits<std::int64_t>::min())},
      {"pow2_64", pow2(64)},
      {"neg_pow2_70", pow2(70, true)},
      {"pow2_1000", pow2(1000)},
      {"pow2_3000", pow2(3000)},
      {"neg_pow2_3000", pow2(3000, true)},
      {"float", 1.5},
      {"neg_zero", -0.0},
      {"inf", std::numeric_limits<double>::infinity()},
      {"str_empty", S("")},
      {"str_ascii", S("hello")},
      {"str_unicode", S("h\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80")},
      {"bytes_empty", B("")},
      {"bytes_small", B(std::string("a\0\xff", 3))},
      {"bytes_70k", B(b70k)},
      {"bytearray_empty", bytearray{}},
      {"bytearray", bytearray{"ab\xff"}},
      {"list_empty", L({})},
      {"list1", L({1})},
      {"list_mixed", L({1, "a", none{}, true, 1.5, B("b")})},
      {"list_2500", list{l2500}},
      {"tuple0", T({})},
      {"tuple1", T({1})},
      {"tuple2", T({1, 2})},
      {"tuple3", T({1, 2, 3})},
      {"tuple5", T({1, 2, 3, 4, 5})},
      {"dict_empty", D({})},
      {"dict1", D({{"a", 1}})},
      {"dict_tuple_keys",
       D({{T({1, 2}), "x"}, {T({3, T({4, 5})}), L({6})}, {none{}, false}, {B("k"), 1.0}})},
      {"dict_nested", D({{"a", D({{"b", D({{"c", L({1, D({{"d", none{}}})})}})}})}})},
      {"dict_1500", dict{d1500}},
      {"shared_list", L({L({1}), L({1})})},
      {"shared_dict", D({{"a", L({1})}, {"b", T({L({1}), L({1})})}})},
      {"kwargs", K({{"a", 1}, {"b", L({2})}})},
      {"blob", blob{std::string("\0blob", 5)}},
      {"secret", secret{"pw"}},
      {"call_error", call_error{"builtins.ValueError: boom\ntraceback"}},
      {"context", context_ref{3, "name"}},
      {"context_noname", context_ref{7, std::nullopt}},
      {"sender", sender_ref{2, 1000}},
      {"dead", dead{}},
      {"call", T({none{}, "os", none{}, "getpid", T({1, B("x")}), K({{"k", "v"}})})},
  };
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

/// Run the helper script with `args`; return its stdout and require exit status 0.
std::string run_helper(const std::string& args) {
  std::string cmd = shell_quote(TEST_PYTHON) + " " +
                    shell_quote(std::string(TEST_DATA_DIR) + "/crosscheck.py") + " " + args;
  FILE* f = ::popen(cmd.c_str(), "r");
  REQUIRE(f != nullptr);
  std::string out;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  int status = ::pclose(f);
  INFO("command: " << cmd);
  REQUIRE(status == 0);
  return out;
}

}  // namespace

TEST_CASE("CPython protocol 2 and 3 pickles decode to the expected values and encodings agree", "[cpython]") {
  std::map<std::string, value> expected;
  for (auto& [name, v] : samples()) expected.emplace(name, v);

  std::istringstream lines(run_helper("dump"));
  std::string name, p2, p3, expect;
  std::size_t seen = 0, compared = 0;
  while (lines >> name >> p2 >> p3 >> expect) {
    INFO("sample " << name);
    auto it = expected.find(name);
    REQUIRE(it != expected.end());
    for (const auto& hexdata : {p2, p3}) {
      auto r = decode(unhex(hexdata));
      INFO("pickle " << hexdata.substr(0, 200) << " -> " << r.ec.message() << " " << r.detail);
      REQUIRE(r);
      CHECK(r.v == it->second);
    }
    // Where the encodings agree by design, ours is byte-identical to CPython's.
    if (expect != "-") {
      CHECK(hex(encode(it->second)) == expect);
      ++compared;
    }
    ++seen;
  }
  CHECK(seen == expected.size());
  CHECK(compared > 30);
}

TEST_CASE("our encodings load in CPython as the expected values", "[cpython]") {
  char path[] = "/tmp/mitogen-wire-crosscheck-XXXXXX";
  int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  auto all = samples();
  {
    std::string text;
    for (const auto& [name, v] : all) text += name + " " + hex(encode(v)) + "\n";
    REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
    ::close(fd);
  }
  std::string out = run_helper("load " + std::string(path));
  ::unlink(path);

  std::istringstream lines(out);
  std::string line;
  std::size_t ok = 0;
  while (std::getline(lines, line)) {
    INFO(line);
    CHECK(line.size() > 3);
    CHECK(line.substr(line.size() - 3) == " ok");
    if (line.size() > 3 && line.substr(line.size() - 3) == " ok") ++ok;
  }
  CHECK(ok == all.size());
}
