// Restricted pickle encoder: protocol 2 plus protocol 3's BINBYTES (docs/protocol.md).
//
// Output matches what CPython's pickle.dumps(v, protocol=2) writes for the same value
// (minus memo opcodes), except that bytes use SHORT_BINBYTES/BINBYTES instead of
// protocol 2's slow `_codecs.encode(text, 'latin1')` spelling.
#include <cstring>
#include <limits>

#include "mitogen/wire/pickle.hpp"
#include "pickle_opcodes.hpp"

namespace mitogen::wire {
namespace {

using namespace pickle_op;

// CPython's pickler appends/sets items in batches of this many.
constexpr std::size_t batch_size = 1000;

class encoder {
 public:
  explicit encoder(std::string& out) : out_(out) {}

  // Recursive: encoded values come from our own code (or from decode(), whose output is
  // bounded by decode_limits::max_depth), never directly from a peer.
  void put(const value& v) {
    std::visit([this](const auto& x) { put_alt(x); }, v.get());
  }

 private:
  void op(std::uint8_t c) { out_.push_back(static_cast<char>(c)); }

  void le32(std::uint32_t v) {
    char b[4] = {static_cast<char>(v), static_cast<char>(v >> 8), static_cast<char>(v >> 16),
                 static_cast<char>(v >> 24)};
    out_.append(b, 4);
  }

  void le64(std::uint64_t v) {
    char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(v >> (8 * i));
    out_.append(b, 8);
  }

  void global(const char* module_and_name_lines) {
    out_.push_back('c');
    out_.append(module_and_name_lines);
  }

  void text(const std::string& s) {
    if (s.size() <= std::numeric_limits<std::uint32_t>::max()) {
      op(BINUNICODE);
      le32(static_cast<std::uint32_t>(s.size()));
    } else {
      op(BINUNICODE8);
      le64(s.size());
    }
    out_.append(s);
  }

  void byte_string(const std::string& s) {
    if (s.size() < 256) {
      op(SHORT_BINBYTES);
      out_.push_back(static_cast<char>(s.size()));
    } else if (s.size() <= std::numeric_limits<std::uint32_t>::max()) {
      op(BINBYTES);
      le32(static_cast<std::uint32_t>(s.size()));
    } else {
      op(BINBYTES8);
      le64(s.size());
    }
    out_.append(s);
  }

  void long_body(const std::string& le) {
    if (le.size() < 256) {
      op(LONG1);
      out_.push_back(static_cast<char>(le.size()));
    } else {
      op(LONG4);
      le32(static_cast<std::uint32_t>(le.size()));
    }
    out_.append(le);
  }

  void items(const std::vector<value>& xs) {
    for (const auto& x : xs) put(x);
  }

  // EMPTY_DICT then batches, as CPython's _batch_setitems does.
  void dict_items(const std::vector<std::pair<value, value>>& kvs) {
    op(EMPTY_DICT);
    for (std::size_t i = 0; i < kvs.size(); i += batch_size) {
      std::size_t n = std::min(batch_size, kvs.size() - i);
      if (n > 1) op(MARK);
      for (std::size_t j = i; j < i + n; ++j) {
        put(kvs[j].first);
        put(kvs[j].second);
      }
      op(n > 1 ? SETITEMS : SETITEM);
    }
  }

  void put_alt(const none&) { op(NONE); }
  void put_alt(const bool& b) { op(b ? NEWTRUE : NEWFALSE); }

  void put_alt(const std::int64_t& i) {
    if (i >= 0 && i <= 0xff) {
      op(BININT1);
      out_.push_back(static_cast<char>(i));
    } else if (i >= 0 && i <= 0xffff) {
      op(BININT2);
      out_.push_back(static_cast<char>(i));
      out_.push_back(static_cast<char>(i >> 8));
    } else if (i >= std::numeric_limits<std::int32_t>::min() &&
               i <= std::numeric_limits<std::int32_t>::max()) {
      op(BININT);
      le32(static_cast<std::uint32_t>(i));
    } else {
      // Minimal little-endian two's complement, as pickle's encode_long.
      auto u = static_cast<std::uint64_t>(i);
      char b[8];
      for (int k = 0; k < 8; ++k) b[k] = static_cast<char>(u >> (8 * k));
      int n = 8;
      // Drop a top byte while it is pure sign extension of the byte below it.
      while (n > 1) {
        auto top = static_cast<unsigned char>(b[n - 1]);
        auto below_sign = (static_cast<unsigned char>(b[n - 2]) & 0x80) != 0;
        if ((top == 0x00 && !below_sign) || (top == 0xff && below_sign))
          --n;
        else
          break;
      }
      op(LONG1);
      out_.push_back(static_cast<char>(n));
      out_.append(b, static_cast<std::size_t>(n));
    }
  }

  void put_alt(const big_int& b) { long_body(b.le_bytes); }

  void put_alt(const double& d) {
    std::uint64_t u;
    std::memcpy(&u, &d, sizeof u);
    op(BINFLOAT);
    char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(u >> (8 * (7 - i)));
    out_.append(b, 8);
  }

  void put_alt(const bytes& b) { byte_string(b.data); }

  void put_alt(const bytearray& b) {
    // Fixed by CPython's fix_imports to builtins.bytearray when loaded.
    global("__builtin__\nbytearray\n");
    if (b.data.empty()) {
      op(EMPTY_TUPLE);
    } else {
      byte_string(b.data);
      op(TUPLE1);
    }
    op(REDUCE);
  }

  void put_alt(const blob& b) {
    global("mitogen.core\nBlob\n");
    byte_string(b.data);
    op(TUPLE1);
    op(REDUCE);
  }

  void put_alt(const str& s) { text(s.utf8); }

  void put_alt(const secret& s) {
    global("mitogen.core\nSecret\n");
    text(s.utf8);
    op(TUPLE1);
    op(REDUCE);
  }

  void put_alt(const list& l) {
    op(EMPTY_LIST);
    for (std::size_t i = 0; i < l.items.size(); i += batch_size) {
      std::size_t n = std::min(batch_size, l.items.size() - i);
      if (n > 1) op(MARK);
      for (std::size_t j = i; j < i + n; ++j) put(l.items[j]);
      op(n > 1 ? APPENDS : APPEND);
    }
  }

  void put_alt(const tuple& t) {
    switch (t.items.size()) {
      case 0: op(EMPTY_TUPLE); return;
      case 1: items(t.items); op(TUPLE1); return;
      case 2: items(t.items); op(TUPLE2); return;
      case 3: items(t.items); op(TUPLE3); return;
      default: op(MARK); items(t.items); op(TUPLE); return;
    }
  }

  void put_alt(const dict& d) { dict_items(d.items); }

  void put_alt(const kwargs& k) {
    global("mitogen.core\nKwargs\n");
    dict_items(k.items);
    op(TUPLE1);
    op(REDUCE);
  }

  void put_alt(const call_error& e) {
    global("mitogen.core\n_unpickle_call_error\n");
    text(e.message);
    op(TUPLE1);
    op(REDUCE);
  }

  void put_alt(const context_ref& c) {
    global("mitogen.core\n_unpickle_context\n");
    put_alt(std::int64_t{c.context_id});
    if (c.name)
      text(*c.name);
    else
      op(NONE);
    op(TUPLE2);
    op(REDUCE);
  }

  void put_alt(const sender_ref& s) {
    global("mitogen.core\n_unpickle_sender\n");
    put_alt(std::int64_t{s.context_id});
    put_alt(std::int64_t{s.handle});
    op(TUPLE2);
    op(REDUCE);
  }

  void put_alt(const dead&) {
    global("mitogen.core\n_DEAD\n");
    op(EMPTY_TUPLE);
    op(REDUCE);
  }

  std::string& out_;
};

// Estimate of the encoded size, looking a few levels deep, so that the common messages
// (a call whose arguments hold one big bytes value) are written with one allocation.
// Underestimates are fine: std::string then grows geometrically.
std::size_t size_hint(const value& v, int depth = 0) {
  constexpr std::size_t max_items = 64;  // keep the estimate O(1)-ish for big containers
  auto seq = [&](const std::vector<value>& xs) {
    std::size_t n = 8;
    if (depth >= 3) return n + 4 * xs.size();
    for (std::size_t i = 0; i < xs.size() && i < max_items; ++i) n += size_hint(xs[i], depth + 1);
    return n + (xs.size() > max_items ? 4 * (xs.size() - max_items) : 0);
  };
  auto map = [&](const std::vector<std::pair<value, value>>& kvs) {
    std::size_t n = 40;
    if (depth >= 3) return n + 8 * kvs.size();
    for (std::size_t i = 0; i < kvs.size() && i < max_items; ++i)
      n += size_hint(kvs[i].first, depth + 1) + size_hint(kvs[i].second, depth + 1);
    return n + (kvs.size() > max_items ? 8 * (kvs.size() - max_items) : 0);
  };
  const auto& s = v.get();
  if (auto* b = std::get_if<bytes>(&s)) return b->data.size() + 9;
  if (auto* b = std::get_if<blob>(&s)) return b->data.size() + 40;
  if (auto* b = std::get_if<bytearray>(&s)) return b->data.size() + 40;
  if (auto* t = std::get_if<str>(&s)) return t->utf8.size() + 9;
  if (auto* t = std::get_if<secret>(&s)) return t->utf8.size() + 40;
  if (auto* e = std::get_if<call_error>(&s)) return e->message.size() + 60;
  if (auto* l = std::get_if<list>(&s)) return seq(l->items);
  if (auto* t = std::get_if<tuple>(&s)) return seq(t->items);
  if (auto* d = std::get_if<dict>(&s)) return map(d->items);
  if (auto* k = std::get_if<kwargs>(&s)) return map(k->items);
  if (auto* b = std::get_if<big_int>(&s)) return b->le_bytes.size() + 5;
  return 16;
}

}  // namespace

void encode_to(const value& v, std::string& out) {
  out.reserve(out.size() + size_hint(v) + 3);
  out.push_back(static_cast<char>(PROTO));
  out.push_back('\x02');
  encoder e(out);
  e.put(v);
  out.push_back(static_cast<char>(STOP));
}

std::string encode(const value& v) {
  std::string out;
  encode_to(v, out);
  return out;
}

}  // namespace mitogen::wire
