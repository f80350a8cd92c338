// Hostile input: every refusal gives its exact errc, nothing crashes, nothing explodes.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>

#include "wire_test_util.hpp"

using namespace mitogen::wire;
using namespace wire_test;

namespace {

// Small builders, so byte strings don't depend on escape-sequence subtleties.
std::string P2() { return std::string("\x80\x02", 2); }
std::string op(unsigned char c) { return std::string(1, static_cast<char>(c)); }
std::string le32(std::uint32_t v) {
  std::string s;
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
  return s;
}
std::string le64(std::uint64_t v) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
  return s;
}
std::string U(const std::string& s) { return "X" + le32(static_cast<std::uint32_t>(s.size())) + s; }
std::string Bb(const std::string& s) { return "C" + op(static_cast<unsigned char>(s.size())) + s; }
std::string G(const std::string& module, const std::string& name) { return "c" + module + "\n" + name + "\n"; }
std::string K1(unsigned char v) { return "K" + op(v); }
std::string put(unsigned char k) { return "q" + op(k); }
std::string get(unsigned char k) { return "h" + op(k); }

void expect(const std::string& data, errc e, const std::string& detail_part = "") {
  auto r = decode(data);
  INFO("input " << hex(data.substr(0, 200)) << " -> " << r.ec.message() << " (" << r.detail << ")");
  CHECK(r.ec == e);
  CHECK_FALSE(r);
  if (!detail_part.empty()) CHECK(r.detail.find(detail_part) != std::string::npos);
  CHECK(r.v == value{});  // no partial value leaks out
}

std::vector<std::string> valid_corpus() {
  std::vector<std::string> c;
  // Our encodings of assorted values.
  for (const value& v :
       {L({1, "two", B("three"), T({4.0, none{}}), D({{"k", L({true, false})}})}),
        T({none{}, "mod", none{}, "fn", T({1, B("x"), pow2(100)}), K({{"k", "v"}})}),
        value(blob{"blob"}), value(secret{"s"}), value(call_error{"e"}),
        value(context_ref{3, "n"}), value(sender_ref{1, 1000}), value(dead{}),
        value(bytearray{"ba"}), value(bytearray{}), I(-70000), pow2(64, true)})
    c.push_back(encode(v));
  // CPython protocol-2 output with memo and _codecs bytes:
  // x=[1]; pickle.dumps([x, x, {'a': x}, b'a\xff', bytearray(b'z'), 2**64], 2)
  c.push_back(unhex(
      "80025d7100285d71014b016168017d71025801000000617103680173635f636f646563730a656e636f64650a71"
      "04580300000061c3bf710558060000006c6174696e317106867107527108635f5f6275696c74696e5f5f0a6279"
      "746561727261790a7109680458010000007a710a680686710b52710c85710d52710e8a0900000000000000000165"
      "2e"));
  return c;
}

}  // namespace

TEST_CASE("the valid corpus decodes", "[hostile]") {
  for (const auto& p : valid_corpus()) {
    auto r = decode(p);
    INFO(hex(p) << " -> " << r.detail);
    CHECK(r);
  }
}

TEST_CASE("every strict prefix of a valid pickle is refused as truncated", "[hostile]") {
  std::string mib_case = encode(L({B(std::string(70000, 'q')), S(std::string(300, 's'))}));
  auto corpus = valid_corpus();
  corpus.push_back(mib_case);
  for (const auto& p : corpus) {
    REQUIRE(decode(p));
    for (std::size_t n = 0; n < p.size(); ++n) {
      auto r = decode(p.substr(0, n));
      INFO("prefix " << n << " of " << hex(p.substr(0, 100)) << ": " << r.detail);
      REQUIRE_FALSE(r);
      // A prefix can end exactly after the last complete opcode before STOP, or inside one.
      CHECK(r.ec == errc::truncated);
    }
  }
}

TEST_CASE("opcodes outside the subset are refused", "[hostile]") {
  const unsigned char refused[] = {
      0x81,  // NEWOBJ
      'b',   // BUILD
      'i',   // INST
      'o',   // OBJ
      'P',   // PERSID
      'Q',   // BINPERSID
      0x82, 0x83, 0x84,  // EXT1/2/4
      0x92,  // NEWOBJ_EX
      0x97, 0x98,  // NEXT_BUFFER, READONLY_BUFFER
      'F', 'L', 'S', 'T', 'U', 'V', 'd', 'l', 'p', 'g', 'x', 0x00, 0xff, '\n',
  };
  for (unsigned char c : refused) {
    std::string in = P2() + op(c) + std::string(16, '\0') + ".";
    char buf[40];
    std::snprintf(buf, sizeof buf, "opcode 0x%02x at offset 2", c);
    expect(in, errc::unknown_opcode, buf);
  }
  // The classic exploit shape: GLOBAL os.system is refused before anything else happens.
  expect(P2() + G("os", "system") + U("id") + "\x85R.", errc::forbidden_global, "global os.system");
  // Text INT forms other than the protocol-0 booleans.
  expect("I5\n.", errc::invalid_value);
  expect("I01", errc::truncated);
}

TEST_CASE("globals outside the table are refused", "[hostile]") {
  const std::pair<const char*, const char*> forbidden[] = {
      {"os", "system"}, {"builtins", "eval"}, {"__builtin__", "eval"}, {"posix", "system"},
      {"mitogen.core", "Foo"}, {"mitogen.core", "Context"}, {"mitogen.core", "Kwargs "},
      {"subprocess", "Popen"}, {"_codecs", "decode"}, {"builtins", "getattr"},
      {"builtins", "str"}, {"mitogen.master", "Blob"}, {"", ""},
  };
  for (auto [m, n] : forbidden) {
    std::string detail = std::string("global ") + m + "." + n;
    expect(P2() + G(m, n) + ")R.", errc::forbidden_global, detail);
    // STACK_GLOBAL spelling.
    expect(P2() + U(m) + U(n) + op(0x93) + ")R.", errc::forbidden_global, detail);
  }
  // Non-printable names are rendered safely and bounded.
  auto r = decode(P2() + G(std::string("a\x1b[2J", 5), std::string(1000, 'n')) + ")R.");
  CHECK(r.ec == errc::forbidden_global);
  CHECK(r.detail.size() < 200);
  CHECK(r.detail.find('\x1b') == std::string::npos);
  // STACK_GLOBAL needs two str.
  expect(P2() + K1(1) + U("x") + op(0x93) + ".", errc::invalid_value);
  // A callable is not a value: not at STOP, not inside a container.
  expect(P2() + G("mitogen.core", "Blob") + ".", errc::invalid_value);
  expect(P2() + "]" + G("mitogen.core", "Blob") + "a.", errc::invalid_value);
  expect(P2() + G("mitogen.core", "Blob") + "\x85.", errc::invalid_value);
  expect(P2() + "}" + G("builtins", "bytes") + K1(1) + "s.", errc::invalid_value);
  expect(P2() + "}" + K1(1) + G("builtins", "bytes") + "s.", errc::invalid_value);
}

TEST_CASE("REDUCE of allowed callables with the wrong arguments", "[hostile]") {
  auto call = [](const std::string& name, const std::string& args) {
    return P2() + G("mitogen.core", name) + args + "R.";
  };
  const std::string none_ = "N";
  std::vector<std::string> bad = {
      call("Blob", U("text") + "\x85"),          // str, not bytes
      call("Blob", ")"),                          // no argument
      call("Blob", Bb("a") + Bb("b") + "\x86"),   // two
      call("_unpickle_context", "(" + K1(1) + "N" + K1(3) + "t"),  // three
      call("Secret", Bb("x") + "\x85"),
      call("Kwargs", "]" "\x85"),
      call("Kwargs", "}" + K1(1) + "\x86"),
      call("Kwargs", G("mitogen.core", "Kwargs") + "}\x85R\x85"),  // Kwargs(Kwargs()): exact shapes
      call("_unpickle_call_error", Bb("x") + "\x85"),
      call("CallError", ")"),
      call("_unpickle_context", "J" + le32(0xffffffffu) + none_ + "\x86"),  // -1
      call("_unpickle_context", "\x8a\x05" + le32(0) + op(1) + none_ + "\x86"),  // 2**32
      call("_unpickle_context", K1(1) + K1(2) + "\x86"),
      call("_unpickle_context", "\x88" + none_ + "\x86"),  // bool is not an int here
      call("_unpickle_context", K1(1) + "\x85"),
      call("_unpickle_sender", K1(1) + K1(0) + "\x86"),    // handle 0
      call("_unpickle_sender", "J" + le32(0xffffffffu) + K1(5) + "\x86"),
      call("_unpickle_sender", K1(1) + U("h") + "\x86"),
      call("_DEAD", none_ + "\x85"),
      P2() + G("_codecs", "encode") + U("a") + U("utf8") + "\x86R.",
      P2() + G("_codecs", "encode") + U("\xe2\x82\xac") + U("latin1") + "\x86R.",  // U+20AC
      P2() + G("_codecs", "encode") + U("a") + "\x85R.",
      P2() + G("_codecs", "encode") + Bb("a") + U("latin1") + "\x86R.",
      P2() + G("builtins", "bytes") + Bb("x") + "\x85R.",
      P2() + G("__builtin__", "bytearray") + U("s") + "\x85R.",
      P2() + G("__builtin__", "bytearray") + U("s") + U("latin-1") + "\x86R.",
      P2() + "]" ")R.",                            // REDUCE of a list
      P2() + G("mitogen.core", "_DEAD") + "]R.",   // arguments not a tuple
  };
  for (const auto& in : bad) expect(in, errc::bad_reduce);
  // The right shapes for contrast.
  CHECK(must_decode(call("_unpickle_context", "\x8a\x05" + le32(0xffffffffu) + op(0) + "N\x86")) ==
        value(context_ref{0xffffffffu, std::nullopt}));
  CHECK(must_decode(call("_unpickle_sender", K1(0) + "J" + le32(0x7fffffff) + "\x86")) ==
        value(sender_ref{0, 0x7fffffff}));
}

TEST_CASE("deep nesting is refused without recursion", "[hostile]") {
  for (std::size_t depth : {std::size_t{10000}, std::size_t{200000}}) {
    std::string lists = P2() + std::string(depth, ']') + std::string(depth - 1, 'a') + ".";
    expect(lists, errc::too_deep);
    std::string tuples = P2() + std::string(depth, '(') + std::string(depth, 't') + ".";
    expect(tuples, errc::too_deep);
    std::string tuple1 = P2() + ")" + std::string(depth, '\x85') + ".";
    expect(tuple1, errc::too_deep);
    std::string dicts = P2();
    for (std::size_t i = 0; i < depth; ++i) dicts += "}N";
    dicts.resize(dicts.size() - 1);
    for (std::size_t i = 1; i < depth; ++i) dicts += "s";
    dicts += ".";
    expect(dicts, errc::too_deep);
    // Open MARKs that are never closed: just a stack error at STOP.
    expect(P2() + std::string(depth, '(') + "N.", errc::stack_error);
  }
}

TEST_CASE("memo bomb fails fast with too_many_nodes", "[hostile]") {
  // t0 = (1, 1); t(k+1) = (tk, tk): 2**60 leaves from ~370 bytes.
  std::string p = P2() + K1(1) + K1(1) + "\x86" + put(0) + "0";
  for (unsigned char k = 0; k < 60; ++k)
    p += get(k) + get(k) + "\x86" + put(static_cast<unsigned char>(k + 1)) + "0";
  p += get(60) + ".";
  REQUIRE(p.size() < 500);
  auto t0 = std::chrono::steady_clock::now();
  expect(p, errc::too_many_nodes);
  auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(ms < 500);

  // Wide variant: one list holding 250 references to a list holding 250 references ...
  std::string w = P2() + "]" + put(0) + "(" + std::string(250, 'N') + "e0";
  for (unsigned char k = 0; k < 5; ++k) {
    w += "]" + put(static_cast<unsigned char>(k + 1)) + "(";
    for (int i = 0; i < 250; ++i) w += get(k);
    w += "e0";
  }
  w += get(5) + ".";
  expect(w, errc::too_many_nodes);

  // Big shared strings: 1000 references to one 64 KiB string cost their bytes.
  std::string s = P2() + "]" + "X" + le32(65536) + std::string(65536, 's') + put(0) + "0(";
  for (int i = 0; i < 1000; ++i) s += get(0);
  s += "e.";
  expect(s, errc::too_many_nodes);
  // ... and so does re-encoding it through _codecs.encode.
  std::string e = P2() + "]" + "X" + le32(65536) + std::string(65536, 's') + put(0) + "0" +
                  U("latin1") + put(1) + "0" + G("_codecs", "encode") + put(2) + "0(";
  for (int i = 0; i < 1000; ++i) e += get(2) + get(0) + get(1) + "\x86R";
  e += "e.";
  expect(e, errc::too_many_nodes);
}

TEST_CASE("self-referential containers are refused", "[hostile]") {
  expect(P2() + "]" + put(0) + get(0) + "a.", errc::invalid_value, "self-referential");
  expect(P2() + "]2a.", errc::invalid_value, "self-referential");  // via DUP
  expect(P2() + "}" + put(0) + K1(1) + get(0) + "s.", errc::invalid_value, "self-referential");
  // Indirect: a = [b], b = [a].
  expect(P2() + "]" + put(0) + "]" + put(1) + get(0) + "a" + "a" + get(1) + "0" + ".",
         errc::invalid_value);
  // Shared but acyclic is fine.
  CHECK(must_decode(P2() + "]" + put(0) + "0]" + get(0) + get(0) + "\x86" "a.") == L({T({L({}), L({})})}));
}

TEST_CASE("unhashable dict keys", "[hostile]") {
  expect(P2() + "}]" + K1(1) + "s.", errc::unhashable_key);
  expect(P2() + "}}" + K1(1) + "s.", errc::unhashable_key);
  expect(P2() + "}(" + K1(1) + K1(2) + "]" + K1(3) + "u.", errc::unhashable_key);  // SETITEMS, 2nd key
  expect(P2() + "}" + G("builtins", "bytearray") + ")R" + K1(1) + "s.", errc::unhashable_key);
  expect(P2() + "}" + op(0x96) + le64(0) + K1(1) + "s.", errc::unhashable_key);
  expect(P2() + "}" + G("mitogen.core", "Kwargs") + "}\x85R" + K1(1) + "s.", errc::unhashable_key);
  expect(P2() + "}" + K1(1) + "]\x86" + K1(1) + "s.", errc::unhashable_key);  // (1, [])
  expect(P2() + "}" + "]\x85\x85" + K1(1) + "s.", errc::unhashable_key);  // (([],),)
  CHECK(must_decode(P2() + "}" + K1(1) + ")\x86" + K1(2) + "s.") == D({{T({1, T({})}), 2}}));
}

TEST_CASE("structural errors", "[hostile]") {
  expect("", errc::truncated);
  expect(P2(), errc::truncated);
  expect(P2() + "N", errc::truncated);
  expect(P2() + "N.x", errc::trailing_data);
  expect(P2() + "N." + P2() + "N.", errc::trailing_data);
  expect(P2() + ".", errc::stack_error);
  expect(P2() + "NN.", errc::stack_error);
  expect(P2() + "(N.", errc::stack_error);
  expect(P2() + "a.", errc::stack_error);
  expect(P2() + "Na.", errc::stack_error);
  expect(P2() + "NNa.", errc::stack_error);  // APPEND to a non-list
  expect(P2() + "]e.", errc::stack_error);   // APPENDS without MARK
  expect(P2() + "(Ne.", errc::stack_error);  // APPENDS without a list below the MARK
  expect(P2() + "}(Nu.", errc::stack_error);  // odd SETITEMS
  expect(P2() + "](NNu.", errc::stack_error);  // SETITEMS to a list
  expect(P2() + "N(\x85.", errc::stack_error);  // TUPLE1 cannot reach below the MARK
  expect(P2() + "0.", errc::stack_error);
  expect(P2() + "1.", errc::stack_error);
  expect(P2() + "2.", errc::stack_error);
  expect(P2() + "t.", errc::stack_error);
  expect(P2() + "R.", errc::stack_error);
  expect(P2() + put(0) + ".", errc::stack_error);
  expect(P2() + get(5) + ".", errc::bad_memo);
  expect(P2() + "j" + le32(0x12345678) + ".", errc::bad_memo);
  expect("\x80\x04N.", errc::bad_protocol);
  expect(std::string("\x80\x00N.", 4), errc::bad_protocol);
  expect("\x80", errc::truncated);
  expect(P2() + "\x95" + le64(100) + "N.", errc::truncated);  // FRAME past the end
}

TEST_CASE("bad UTF-8 text", "[hostile]") {
  for (const std::string& bad : {std::string("\xff"), std::string("\xc0\x80"),  // overlong NUL
                                 std::string("\xed\xa0\x80"),                    // lone surrogate
                                 std::string("\xf4\x90\x80\x80"),                // > U+10FFFF
                                 std::string("\xe2\x82"), std::string("abcdefgh\x80"),
                                 std::string("\xe0\x80\xaf")}) {
    expect(P2() + U(bad) + ".", errc::bad_utf8);
    expect(P2() + op(0x8c) + op(static_cast<unsigned char>(bad.size())) + bad + ".", errc::bad_utf8);
  }
  // What CPython writes for '\ud800' (surrogatepass) is refused too.
  expect(unhex("80025803000000eda08071002e"), errc::bad_utf8);
}

TEST_CASE("length fields larger than the input", "[hostile]") {
  // Each claims ~4 GiB (or more) on a ~20-byte input: refused without allocating.
  expect(P2() + "X" + le32(0xfffffff0u) + "abcdefghijkl.", errc::truncated);
  expect(P2() + "B" + le32(0xfffffff0u) + "abcdefghijkl.", errc::truncated);
  expect(P2() + op(0x8d) + le64(0xfffffff0ull) + "abcd.", errc::truncated);
  expect(P2() + op(0x8e) + le64(~0ull) + "abcd.", errc::truncated);
  expect(P2() + op(0x96) + le64(1ull << 63) + "abcd.", errc::truncated);
  expect(P2() + "C" + op(200) + "abcd.", errc::truncated);
  expect(P2() + op(0x8a) + op(200) + "abcd.", errc::truncated);
  // LONG4: lengths above 64 KiB (or negative) are invalid whatever the input holds.
  expect(P2() + op(0x8b) + le32(0xfffffff0u) + "abcdefghijkl.", errc::invalid_value);
  expect(P2() + op(0x8b) + le32(0x7ffffff0u) + "abcdefghijkl.", errc::invalid_value);
  expect(P2() + op(0x8b) + le32(70000) + std::string(70000, '\x01') + ".", errc::invalid_value);
  expect(P2() + op(0x8b) + le32(1000) + "abcd.", errc::truncated);
  CHECK(must_decode(P2() + op(0x8b) + le32(65536) + std::string(65535, '\0') + "\x01" + ".")
            .is<big_int>());
}

TEST_CASE("mutated pickles never crash the decoder", "[hostile][fuzz]") {
  auto corpus = valid_corpus();
  corpus.push_back(encode(D({{T({1, 2}), L({S("\xc3\xa9"), B(std::string(300, 'b'))})},
                             {"k", K({{"a", context_ref{1, "c"}}})}})));
  // Opcodes worth splicing in: the accepted ones plus a few refused ones.
  const std::string interesting = std::string("(.012GIJKMNRXB]aCcehjqrstu})") +
                                  "\x80\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x93\x94\x95\x96\x81" "bi";
  std::mt19937_64 rng(0x6d69746f67656eULL);  // fixed seed: deterministic
  std::size_t ok = 0, refused = 0;
  constexpr int iterations = 200000;
  for (int it = 0; it < iterations; ++it) {
    std::string p = corpus[rng() % corpus.size()];
    int mutations = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < mutations && !p.empty(); ++m) {
      std::size_t at = rng() % p.size();
      switch (rng() % 7) {
        case 0: p[at] = static_cast<char>(rng()); break;
        case 1: p[at] ^= static_cast<char>(1u << (rng() % 8)); break;
        case 2: p.insert(p.begin() + static_cast<std::ptrdiff_t>(at), static_cast<char>(rng())); break;
        case 3: p.erase(at, 1 + rng() % 4); break;
        case 4: p[at] = interesting[rng() % interesting.size()]; break;
        case 5: {  // duplicate a chunk (memo refs, marks, nesting)
          std::size_t len = 1 + rng() % 16;
          std::string chunk = p.substr(at, len);
          p.insert(rng() % (p.size() + 1), chunk);
          break;
        }
        case 6: p.resize(at); break;
      }
    }
    auto r = decode(p);
    if (r) {
      ++ok;
      // Whatever decodes must re-encode to something that decodes to the same bytes again.
      std::string e1 = encode(r.v);
      auto r2 = decode(e1);
      REQUIRE(r2);
      REQUIRE(encode(r2.v) == e1);
    } else {
      ++refused;
      REQUIRE(r.ec.category() == wire_category());
      REQUIRE_FALSE(r.detail.empty());
    }
  }
  WARN("fuzz: " << ok << " decoded, " << refused << " refused");
  CHECK(ok + refused == iterations);
  CHECK(ok > 100);  // the loop exercised success paths too
}
