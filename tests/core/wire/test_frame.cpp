// Framing: header layout, incremental parsing across any chunking, refusals.
#include <catch2/catch.hpp>

#include <vector>

#include "mitogen/wire/frame.hpp"
#include "wire_test_util.hpp"

using namespace mitogen::wire;
using wire_test::unhex;

namespace {

message make(std::uint32_t dst, std::uint32_t src, std::uint32_t handle, std::string data,
             std::uint32_t reply_to = 0) {
  message m;
  m.dst_id = dst;
  m.src_id = src;
  m.auth_id = src;
  m.handle = handle;
  m.reply_to = reply_to;
  m.data = std::move(data);
  return m;
}

bool same(const message& a, const message& b) {
  return a.dst_id == b.dst_id && a.src_id == b.src_id && a.auth_id == b.auth_id &&
         a.handle == b.handle && a.reply_to == b.reply_to && a.data == b.data;
}

std::span<const std::uint8_t> span_of(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

/// Feed `stream` in chunks of `chunk` bytes; collect messages until the parser says bad.
std::vector<message> feed(frame_parser& p, const std::string& stream, std::size_t chunk,
                          bool& bad) {
  std::vector<message> out;
  bad = false;
  for (std::size_t off = 0; off < stream.size() && !bad; off += chunk) {
    auto in = span_of(stream).subspan(off, std::min(chunk, stream.size() - off));
    while (!in.empty()) {
      message m;
      auto st = p.parse(in, m);
      if (st == frame_parser::status::good) {
        out.push_back(std::move(m));
      } else if (st == frame_parser::status::bad) {
        bad = true;
        break;
      } else {
        REQUIRE(in.empty());  // need_more only once the chunk is used up
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("encode_frame writes the >hLLLLLL header then the payload", "[frame]") {
  // struct.pack('>hLLLLLL', 0x4d49, 1, 2, 3, 101, 1000, 3) + b'abc'
  message m = make(1, 2, CALL_FUNCTION, "abc", 1000);
  m.auth_id = 3;
  std::string expect = unhex("4d49000000010000000200000003000000650000" "03e800000003") + "abc";
  CHECK(encode_frame(m) == expect);

  std::uint8_t hdr[header_len];
  encode_header(m, hdr);
  CHECK(std::string(reinterpret_cast<char*>(hdr), header_len) == expect.substr(0, header_len));

  message big = make(0xffffffffu, 0x80000000u, 0xfffffffeu, "", IS_DEAD);
  CHECK(encode_frame(big) == unhex("4d49ffffffff8000000080000000fffffffe000003e700000000"));
}

TEST_CASE("frame_parser yields the same messages for any chunking", "[frame]") {
  std::vector<message> msgs = {
      make(1, 0, CALL_FUNCTION, "first", 1000),
      make(0, 1, 1000, ""),  // zero-length payload
      make(2, 0, SHUTDOWN, ""),
      make(0, 2, FORWARD_LOG, std::string("x\0y\0z", 5)),
      make(3, 0, 1001, std::string(100000, 'p')),
      message::dead(5, 1002, "reason"),
  };
  std::string stream;
  for (const auto& m : msgs) stream += encode_frame(m);

  for (std::size_t chunk : {std::size_t{1}, std::size_t{2}, std::size_t{7}, std::size_t{25},
                            std::size_t{26}, std::size_t{27}, std::size_t{4093}, stream.size()}) {
    INFO("chunk " << chunk);
    frame_parser p;
    bool bad = false;
    auto got = feed(p, stream, chunk, bad);
    CHECK_FALSE(bad);
    CHECK(p.idle());
    REQUIRE(got.size() == msgs.size());
    for (std::size_t i = 0; i < msgs.size(); ++i) CHECK(same(got[i], msgs[i]));
    CHECK(got.back().is_dead());
  }
}

TEST_CASE("frame_parser returns good once per message and leaves the rest unconsumed", "[frame]") {
  std::string stream = encode_frame(make(1, 0, 100, "a")) + encode_frame(make(1, 0, 101, "bb"));
  frame_parser p;
  auto in = span_of(stream);
  message m;
  REQUIRE(p.parse(in, m) == frame_parser::status::good);
  CHECK(m.handle == 100);
  CHECK(in.size() == header_len + 2);
  REQUIRE(p.parse(in, m) == frame_parser::status::good);
  CHECK(m.data == "bb");
  CHECK(in.empty());
  CHECK(p.parse(in, m) == frame_parser::status::need_more);
  CHECK(p.idle());
}

TEST_CASE("frame_parser: partial header and payload are not idle", "[frame]") {
  std::string f = encode_frame(make(1, 0, 100, "payload"));
  frame_parser p;
  message m;
  auto in = span_of(f).first(10);
  CHECK(p.parse(in, m) == frame_parser::status::need_more);
  CHECK_FALSE(p.idle());
  in = span_of(f).subspan(10, header_len - 10 + 3);
  CHECK(p.parse(in, m) == frame_parser::status::need_more);
  CHECK_FALSE(p.idle());
  in = span_of(f).subspan(header_len + 3);
  CHECK(p.parse(in, m) == frame_parser::status::good);
  CHECK(m.data == "payload");
  CHECK(p.idle());
}

TEST_CASE("frame_parser refuses bad magic and stays bad", "[frame]") {
  std::string f = encode_frame(make(1, 0, 100, "x"));
  f[1] = 'J';  // "MJ"
  for (std::size_t chunk : {std::size_t{1}, f.size()}) {
    frame_parser p;
    bool bad = false;
    auto got = feed(p, f, chunk, bad);
    CHECK(bad);
    CHECK(got.empty());
    CHECK(p.error() == errc::bad_magic);
    // Stays bad even if fed a valid frame afterwards.
    std::string good = encode_frame(make(1, 0, 100, "y"));
    auto in = span_of(good);
    message m;
    CHECK(p.parse(in, m) == frame_parser::status::bad);
    CHECK(p.error() == errc::bad_magic);
  }
}

TEST_CASE("frame_parser refuses a length above the maximum before reading the payload", "[frame]") {
  SECTION("exactly the maximum is fine") {
    frame_parser p(10);
    std::string f = encode_frame(make(1, 0, 100, std::string(10, 'z')));
    bool bad = false;
    auto got = feed(p, f, 3, bad);
    CHECK_FALSE(bad);
    REQUIRE(got.size() == 1);
    CHECK(got[0].data == std::string(10, 'z'));
  }
  SECTION("one more is refused") {
    frame_parser p(10);
    std::string f = encode_frame(make(1, 0, 100, std::string(11, 'z')));
    auto in = span_of(f).first(header_len);  // header alone suffices to refuse
    message m;
    CHECK(p.parse(in, m) == frame_parser::status::bad);
    CHECK(p.error() == errc::message_too_large);
  }
  SECTION("a 4 GiB claim with the default maximum") {
    frame_parser p;
    std::string h = unhex("4d4900000001000000000000000000000064" "00000000" "ffffffff");
    auto in = span_of(h);
    message m;
    CHECK(p.parse(in, m) == frame_parser::status::bad);
    CHECK(p.error() == errc::message_too_large);
    CHECK(p.error().category().name() == std::string("mitogen.wire"));
  }
}

TEST_CASE("error category names every errc", "[frame]") {
  for (int e = static_cast<int>(errc::bad_magic); e <= static_cast<int>(errc::invalid_value); ++e) {
    std::error_code ec = static_cast<errc>(e);
    CHECK(ec.category() == wire_category());
    CHECK(ec.message().find("unknown") == std::string::npos);
  }
  CHECK(std::error_code(errc::bad_utf8).message() == "text is not valid UTF-8");
}
