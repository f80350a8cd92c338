// Properties checked by the fuzz targets and by test_fuzz_regressions (see fuzz_checks.hpp).
#include "fuzz_checks.hpp"

#include <cmath>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "context/bootstrap.hpp"  // private header, from core/src
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/pickle.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen_fuzz {
namespace {

namespace w = mitogen::wire;

/// Chunk sizes from a one-byte seed: mostly small (splitting headers and markers
/// everywhere), now and then empty or large.
class chunker {
 public:
  explicit chunker(std::uint8_t seed) : s_(0x9e3779b9u ^ (seed * 0x01000193u)) {}
  std::size_t next() {
    s_ ^= s_ << 13;
    s_ ^= s_ >> 17;
    s_ ^= s_ << 5;
    switch (s_ % 8) {
      case 0: return 0;
      case 1: return 4096;
      default: return 1 + (s_ >> 8) % 29;
    }
  }

 private:
  std::uint32_t s_;
};

std::string str_of(std::span<const std::uint8_t> s) {
  return {reinterpret_cast<const char*>(s.data()), s.size()};
}

// ---- frames ---------------------------------------------------------------------------

struct frame_outcome {
  std::vector<w::message> msgs;
  bool bad = false;
  std::error_code ec;
  std::size_t used = 0;  ///< bytes consumed by the good messages
};

bool same_message(const w::message& a, const w::message& b) {
  return a.dst_id == b.dst_id && a.src_id == b.src_id && a.auth_id == b.auth_id &&
         a.handle == b.handle && a.reply_to == b.reply_to && a.data == b.data;
}

std::uint32_t be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}

/// The protocol.md frame rules, written the obvious way over the whole input.
frame_outcome reference_frames(std::span<const std::uint8_t> s, std::uint32_t max) {
  frame_outcome r;
  std::size_t o = 0;
  while (s.size() - o >= w::header_len) {
    const std::uint8_t* h = s.data() + o;
    if (((h[0] << 8) | h[1]) != w::header_magic) {
      r.bad = true;
      r.ec = w::errc::bad_magic;
      break;
    }
    std::uint32_t len = be32(h + 22);
    if (len > max) {
      r.bad = true;
      r.ec = w::errc::message_too_large;
      break;
    }
    if (s.size() - o - w::header_len < len) break;
    w::message m;
    m.dst_id = be32(h + 2);
    m.src_id = be32(h + 6);
    m.auth_id = be32(h + 10);
    m.handle = be32(h + 14);
    m.reply_to = be32(h + 18);
    m.data.assign(reinterpret_cast<const char*>(h + w::header_len), len);
    r.msgs.push_back(std::move(m));
    o += w::header_len + len;
  }
  r.used = o;
  return r;
}

/// Feed `s` to one frame_parser in the chunks `sizes` yields (0: all at once).
std::string run_parser(std::span<const std::uint8_t> s, std::uint32_t max, chunker* sizes,
                       frame_outcome& r) {
  w::frame_parser p(max);
  std::size_t o = 0;
  while (o < s.size() && !r.bad) {
    std::size_t n = sizes ? std::min(sizes->next(), s.size() - o) : s.size() - o;
    std::span<const std::uint8_t> in = s.subspan(o, n);
    for (;;) {
      const std::size_t before = in.size();
      w::message m;
      auto st = p.parse(in, m);
      if (in.size() > before) return "parse() grew its input span";
      o += before - in.size();
      if (st == w::frame_parser::status::bad) {
        r.bad = true;
        r.ec = p.error();
        if (!r.ec) return "bad without an error code";
        // Sticky: a bad parser refuses everything after, consuming nothing.
        std::span<const std::uint8_t> again = s.subspan(o);
        if (p.parse(again, m) != w::frame_parser::status::bad || again.size() != s.size() - o)
          return "parser recovered after bad";
        break;
      }
      if (st == w::frame_parser::status::good) {
        if (m.data.size() > max) return "message larger than the maximum";
        r.msgs.push_back(std::move(m));
        r.used = o;
        continue;
      }
      if (!in.empty()) return "need_more with input left";
      break;
    }
  }
  if (!r.bad && p.idle() != (r.used == s.size())) return "idle() disagrees with the bytes fed";
  return {};
}

std::string compare(const frame_outcome& got, const frame_outcome& want, const char* how) {
  std::string w = std::string(" (") + how + ")";
  if (got.bad != want.bad) return "verdict differs from the reference" + w;
  if (got.bad && got.ec != want.ec) return "error " + got.ec.message() + " instead of " + want.ec.message() + w;
  if (got.msgs.size() != want.msgs.size()) return "message count differs from the reference" + w;
  for (std::size_t i = 0; i < got.msgs.size(); ++i)
    if (!same_message(got.msgs[i], want.msgs[i])) return "message " + std::to_string(i) + " differs" + w;
  if (got.used != want.used) return "consumed byte count differs" + w;
  return {};
}

// ---- pickles --------------------------------------------------------------------------

bool has_nan(const w::value& v) {
  return std::visit(
      [](const auto& x) -> bool {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, double>) {
          return std::isnan(x);
        } else if constexpr (std::is_same_v<T, w::list> || std::is_same_v<T, w::tuple>) {
          for (const auto& i : x.items)
            if (has_nan(i)) return true;
          return false;
        } else if constexpr (std::is_same_v<T, w::dict> || std::is_same_v<T, w::kwargs>) {
          for (const auto& [k, val] : x.items)
            if (has_nan(k) || has_nan(val)) return true;
          return false;
        } else {
          return false;
        }
      },
      v.get());
}

}  // namespace

std::string check_frame(std::span<const std::uint8_t> data) {
  if (data.size() < 2) return {};
  // Small maxima exercise message_too_large; 255 means the default (nothing that big
  // ever arrives, so only the reservation logic is exercised).
  const std::uint32_t max = data[0] == 255 ? w::default_max_message_size : data[0] * 3u;
  chunker sizes(data[1]);
  auto s = data.subspan(2);

  frame_outcome want = reference_frames(s, max);
  std::size_t re = 0;
  for (const auto& m : want.msgs) {
    std::string f = w::encode_frame(m);
    if (f != str_of(s.subspan(re, f.size()))) return "encode_frame does not give back the input";
    re += f.size();
  }

  frame_outcome whole, chunked;
  if (auto e = run_parser(s, max, nullptr, whole); !e.empty()) return e + " (whole)";
  if (auto e = compare(whole, want, "whole"); !e.empty()) return e;
  if (auto e = run_parser(s, max, &sizes, chunked); !e.empty()) return e + " (chunked)";
  return compare(chunked, want, "chunked");
}

std::string check_pickle(std::span<const std::uint8_t> data) {
  auto r = w::decode(data);
  if (!r) {
    if (r.ec.category() != w::wire_category()) return "refusal outside the wire category";
    if (!(r.v == w::value{})) return "refusal leaks a partial value";
    if (r.detail.size() > 512) return "unbounded error detail";
    return {};
  }
  (void)w::describe(r.v);
  std::string e1 = w::encode(r.v);
  auto r2 = w::decode(e1);
  if (!r2) return "encode(decode(x)) refused: " + r2.ec.message() + " (" + r2.detail + ")";
  if (!has_nan(r.v) && !(r2.v == r.v)) return "decode(encode(v)) != v";
  if (w::encode(r2.v) != e1) return "encoding not stable across a round trip";
  return {};
}

std::string check_bootstrap(std::span<const std::uint8_t> data) {
  using scanner = mitogen::detail::marker_scanner;
  if (data.empty()) return {};
  chunker sizes(data[0]);
  const std::string stream = str_of(data.subspan(1));

  // Where a plain search of the whole stream puts the markers.
  const std::string_view sv = stream;
  const std::size_t p0 = sv.find("MITO000\n");
  const std::size_t p1 = p0 == std::string_view::npos ? p0 : sv.find("MITO001\n", p0 + 8);

  // Drive the scanner as local.cpp's raw callback and stream::handle_input do.
  scanner sc;
  std::string pending;  // stream::raw_pending_
  std::size_t fed = 0;
  int stage1 = 0, agent = 0;
  std::size_t stage1_at = 0;  // stream offset just past MITO000, as the scanner reported it
  std::size_t dropped = 0;    // stream offset of pending[0]
  bool framed = false;
  while (fed < stream.size() && !framed) {
    std::size_t n = std::min(sizes.next(), stream.size() - fed);
    pending.append(stream, fed, n);
    fed += n;
    std::size_t total = 0;
    for (;;) {
      std::size_t used = 12345;
      const std::string_view rest = std::string_view(pending).substr(total);
      auto ev = sc.scan(rest, used);
      if (used > rest.size()) return "scan consumed more than it was given";
      total += used;
      if (ev == scanner::event::none) break;
      if (ev == scanner::event::stage1_ready) {
        if (stage1++ || agent) return "stage1_ready twice or after agent_ready";
        stage1_at = dropped + total;
        continue;
      }
      if (ev == scanner::event::agent_ready) {
        if (!stage1) return "agent_ready before stage1_ready";
        if (agent++) return "agent_ready twice";
        continue;
      }
      if (!agent) return "framed before agent_ready";
      framed = true;
      break;
    }
    pending.erase(0, total);
    dropped += total;
    if (sc.noise().size() > 4096 + 8) return "noise grows without bound";
  }
  if (framed) {
    std::size_t again = 1;
    if (sc.scan("MITO000\nMITO001\n", again) != scanner::event::none || again != 0)
      return "scanner still scanning after it handed over to frames";
  }

  if ((p0 != std::string_view::npos) != (stage1 == 1)) return "stage1_ready where the stream has no MITO000, or missed";
  if (stage1 && stage1_at != p0 + 8) return "stage1_ready at the wrong offset";
  if ((p1 != std::string_view::npos) != (agent == 1)) return "agent_ready where the stream has no MITO001, or missed";
  if (agent) {
    // After MITO001: an optional "MITO002\n" (upstream's second marker), then frames.
    static constexpr std::string_view ec2 = "MITO002\n";
    const std::string_view after = sv.substr(p1 + 8);
    const bool undecided = after.size() < ec2.size() && ec2.substr(0, after.size()) == after;
    if (undecided) {
      if (framed) return "handed over to frames before it could tell MITO002 from a frame";
    } else {
      if (!framed) return "bytes after MITO001 never handed to the frame parser";
      const std::size_t start = p1 + 8 + (after.substr(0, ec2.size()) == ec2 ? ec2.size() : 0);
      // The frame parser gets what the stream still holds plus everything not yet read.
      std::string rest = pending + stream.substr(fed);
      if (rest != stream.substr(start)) return "frames do not start right after MITO001 / MITO002";
    }
  }
  return {};
}

}  // namespace mitogen_fuzz
