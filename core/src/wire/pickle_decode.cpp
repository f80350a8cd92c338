// Restricted pickle decoder: the opcode subset of docs/protocol.md, nothing else.
//
// Everything decoded here comes from an untrusted peer, so the decoder is written to be
// boring under attack:
//  * deny by default: an opcode or global not listed below is refused;
//  * no recursion anywhere (explicit stacks), so hostile nesting cannot overflow the C stack;
//  * every length read from the input is checked against the bytes that remain before
//    anything is allocated from it;
//  * memo references are never copied eagerly: values are built as an arena of nodes
//    (containers hold node indices), and the final value tree is materialised once at STOP
//    under a node budget, so a few hundred bytes of BINGETs cannot expand into gigabytes.
//
// Design of the arena / memo:
//  CPython memoizes a list right after EMPTY_LIST and appends its items afterwards
//  (EMPTY_LIST, BINPUT 0, MARK, ..., APPENDS). A memo that stored a *copy* would see the
//  empty list. Here the memo stores a node index, and APPEND mutates that node, so a later
//  BINGET refers to the filled list, like Python's shared reference. Materialisation then
//  copies shared subtrees (Python would share them; our value type is a tree), charging
//  each copy against the budget, and refuses cycles (l = []; l.append(l)). Nodes reached
//  exactly once (the common case, e.g. a 1 MiB bytes argument) are moved, not copied.
#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "mitogen/wire/pickle.hpp"
#include "pickle_opcodes.hpp"

namespace mitogen::wire {
namespace {

using namespace pickle_op;

/// Largest LONG4 body accepted (a 524288-bit integer); bigger ones only cost CPU.
constexpr std::size_t max_long4_len = 64 * 1024;

/// What a node of the arena is.
enum class kind : std::uint8_t {
  leaf,           ///< a finished scalar held in node::leaf
  list,           ///< kids: items (mutable until STOP: APPEND/APPENDS)
  tuple,          ///< kids: items
  dict,           ///< kids: key0, value0, key1, value1, ...
  kwargs,         ///< like dict; a snapshot of the dict passed to Kwargs()
  callable,       ///< an allowed global; only REDUCE may consume it
  blob_of,        ///< Blob(kids[0]: bytes leaf)
  secret_of,      ///< Secret(kids[0]: str leaf)
  call_error_of,  ///< _unpickle_call_error(kids[0]: str leaf)
  bytearray_of,   ///< bytearray(kids[0]: bytes leaf)
};

/// The allowed globals (docs/protocol.md table).
enum class callable_id : std::uint8_t {
  kwargs,
  blob,
  secret,
  call_error,
  context,
  sender,
  dead,
  codecs_encode,
  bytes,
  bytearray,
};

struct allowed_global {
  std::string_view module;
  std::string_view name;
  callable_id id;
};

constexpr allowed_global allowed_globals[] = {
    {"mitogen.core", "Kwargs", callable_id::kwargs},
    {"mitogen.core", "Blob", callable_id::blob},
    {"mitogen.core", "Secret", callable_id::secret},
    {"mitogen.core", "_unpickle_call_error", callable_id::call_error},
    {"mitogen.core", "CallError", callable_id::call_error},
    {"mitogen.core", "_unpickle_context", callable_id::context},
    {"mitogen.core", "_unpickle_sender", callable_id::sender},
    {"mitogen.core", "_DEAD", callable_id::dead},
    {"_codecs", "encode", callable_id::codecs_encode},
    {"__builtin__", "bytes", callable_id::bytes},
    {"builtins", "bytes", callable_id::bytes},
    {"__builtin__", "bytearray", callable_id::bytearray},
    {"builtins", "bytearray", callable_id::bytearray},
};

struct node {
  value leaf;                        ///< kind::leaf only
  std::vector<std::uint32_t> kids;   ///< containers and *_of wrappers
  kind k = kind::leaf;
  callable_id fn = callable_id::dead;  ///< kind::callable only
  bool hashable = true;              ///< could Python use this as a dict key?
  bool active = false;               ///< on the current materialisation path (cycle check)
  std::uint8_t visits = 0;           ///< times reached from the root, saturating at 2
};

/// Strict UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF), as Python's
/// decoder. Lone surrogates written by pickle's 'surrogatepass' are refused.
bool valid_utf8(const std::uint8_t* s, std::size_t n) noexcept {
  std::size_t i = 0;
  while (i < n) {
    if (n - i >= 8) {  // ASCII fast path, 8 bytes at a time
      std::uint64_t w;
      std::memcpy(&w, s + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    std::uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
    } else if (c < 0xc2) {
      return false;  // stray continuation byte or overlong 2-byte form
    } else if (c < 0xe0) {
      if (n - i < 2 || (s[i + 1] & 0xc0) != 0x80) return false;
      i += 2;
    } else if (c < 0xf0) {
      if (n - i < 3) return false;
      std::uint8_t c1 = s[i + 1], c2 = s[i + 2];
      if ((c1 & 0xc0) != 0x80 || (c2 & 0xc0) != 0x80) return false;
      if (c == 0xe0 && c1 < 0xa0) return false;   // overlong
      if (c == 0xed && c1 >= 0xa0) return false;  // UTF-16 surrogate
      i += 3;
    } else if (c < 0xf5) {
      if (n - i < 4) return false;
      std::uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
      if ((c1 & 0xc0) != 0x80 || (c2 & 0xc0) != 0x80 || (c3 & 0xc0) != 0x80) return false;
      if (c == 0xf0 && c1 < 0x90) return false;   // overlong
      if (c == 0xf4 && c1 >= 0x90) return false;  // above U+10FFFF
      i += 4;
    } else {
      return false;
    }
  }
  return true;
}

/// `text.encode('latin-1')` for valid UTF-8 `text`; false if a code point is >= 256.
bool utf8_to_latin1(const std::string& text, std::string& out) {
  out.clear();
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const std::uint8_t*>(text.data());
  std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    std::uint8_t c = s[i];
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
      ++i;
    } else if (c == 0xc2 || c == 0xc3) {  // U+0080..U+00FF (input already validated)
      out.push_back(static_cast<char>(((c & 0x1f) << 6) | (s[i + 1] & 0x3f)));
      i += 2;
    } else {
      return false;
    }
  }
  return true;
}

/// Printable rendering of attacker-chosen names for error details: bounded and ASCII only.
std::string printable(std::string_view s) {
  constexpr std::size_t max_len = 64;
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < max_len; ++i) {
    char c = s[i];
    out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  }
  if (s.size() > max_len) out += "...";
  return out;
}

std::string hex_byte(std::uint8_t b) {
  static const char digits[] = "0123456789abcdef";
  return std::string("0x") + digits[b >> 4] + digits[b & 15];
}

/// Bytes of the strings a leaf owns, for charging copies of big leaves.
std::size_t leaf_bytes(const value& v) noexcept {
  return std::visit(
      [](const auto& x) -> std::size_t {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bytes> || std::is_same_v<T, bytearray> ||
                      std::is_same_v<T, blob>)
          return x.data.size();
        else if constexpr (std::is_same_v<T, str> || std::is_same_v<T, secret>)
          return x.utf8.size();
        else if constexpr (std::is_same_v<T, big_int>)
          return x.le_bytes.size();
        else if constexpr (std::is_same_v<T, call_error>)
          return x.message.size();
        else if constexpr (std::is_same_v<T, context_ref>)
          return x.name ? x.name->size() : 0;
        else
          return 0;
      },
      v.get());
}

class decoder {
 public:
  decoder(std::span<const std::uint8_t> data, const decode_limits& limits)
      : p_(data.data()),
        n_(data.size()),
        max_depth_(limits.max_depth),
        budget_(limits.max_nodes ? limits.max_nodes : 16 * data.size() + 65536) {
    // Modest: a 1 MiB bytes payload is one node, not 100k.
    nodes_.reserve(std::min<std::size_t>(n_ / 8 + 8, 4096));
  }

  decode_result run() {
    decode_result r;
    if (!parse(r.v)) {
      r.ec = make_error_code(err_);
      r.detail = std::move(detail_);
      r.v = value{};
    }
    return r;
  }

 private:
  // ---- errors and input ---------------------------------------------------------------

  bool fail(errc e, std::string detail) {
    err_ = e;
    detail_ = std::move(detail);
    return false;
  }

  std::string at() const { return " at offset " + std::to_string(op_pos_); }

  std::size_t remaining() const noexcept { return n_ - pos_; }

  bool need(std::size_t k) {
    if (remaining() < k) return fail(errc::truncated, "input ends inside opcode" + at());
    return true;
  }

  std::uint64_t le(std::size_t k) noexcept {  // caller checked need(k)
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < k; ++i) v |= std::uint64_t{p_[pos_ + i]} << (8 * i);
    pos_ += k;
    return v;
  }

  /// Read a length field of `k` bytes and check the body fits in the input.
  bool length(std::size_t k, std::size_t& len) {
    if (!need(k)) return false;
    std::uint64_t v = le(k);
    if (v > remaining()) return fail(errc::truncated, "length " + std::to_string(v) + at());
    len = static_cast<std::size_t>(v);
    return true;
  }

  /// A "\n"-terminated line (GLOBAL, INT); the newline is consumed, not returned.
  bool line(std::string_view& out) {
    const void* nl = std::memchr(p_ + pos_, '\n', remaining());
    if (!nl) return fail(errc::truncated, "unterminated line" + at());
    auto len = static_cast<std::size_t>(static_cast<const std::uint8_t*>(nl) - (p_ + pos_));
    out = {reinterpret_cast<const char*>(p_ + pos_), len};
    pos_ += len + 1;
    return true;
  }

  // ---- arena and stack ----------------------------------------------------------------

  bool new_node(node&& nd, std::uint32_t& idx) {
    if (nodes_.size() >= std::numeric_limits<std::uint32_t>::max())
      return fail(errc::too_many_nodes, "arena full");
    idx = static_cast<std::uint32_t>(nodes_.size());
    nodes_.push_back(std::move(nd));
    return true;
  }

  bool push_node(node&& nd) {
    std::uint32_t idx;
    if (!new_node(std::move(nd), idx)) return false;
    stack_.push_back(idx);
    return true;
  }

  bool push_leaf(value v) {
    node nd;
    nd.leaf = std::move(v);
    nd.hashable = !nd.leaf.is<bytearray>();
    return push_node(std::move(nd));
  }

  bool push_container(kind k) {
    node nd;
    nd.k = k;
    nd.hashable = k == kind::tuple;
    return push_node(std::move(nd));
  }

  /// Stack bottom visible to the current opcode: items below the top MARK are off limits.
  std::size_t fence() const noexcept { return marks_.empty() ? 0 : marks_.back(); }

  bool have(std::size_t k) {
    if (stack_.size() - fence() < k) return fail(errc::stack_error, "stack underflow" + at());
    return true;
  }

  /// Pop the top MARK, returning the stack position it marked.
  bool pop_mark(std::size_t& m) {
    if (marks_.empty()) return fail(errc::stack_error, "no MARK" + at());
    m = marks_.back();
    marks_.pop_back();
    return true;
  }

  /// A callable is not a value: it may not go into a container.
  bool item_ok(std::uint32_t idx) {
    if (nodes_[idx].k == kind::callable)
      return fail(errc::invalid_value, "callable used as a value" + at());
    return true;
  }

  bool key_ok(std::uint32_t idx) {
    if (!item_ok(idx)) return false;
    if (!nodes_[idx].hashable) return fail(errc::unhashable_key, "unhashable dict key" + at());
    return true;
  }

  /// True if node `idx` is a finished scalar of type T (e.g. leaf_is(i, str{})).
  template <class T>
  bool leaf_is(std::uint32_t idx, T) const {
    const node& nd = nodes_[idx];
    return nd.k == kind::leaf && nd.leaf.is<T>();
  }

  // ---- opcodes ------------------------------------------------------------------------

  bool parse(value& out) {
    for (;;) {
      if (pos_ >= n_) return fail(errc::truncated, "input ends before STOP");
      op_pos_ = pos_;
      std::uint8_t op = p_[pos_++];
      bool ok = true;
      switch (op) {
        case PROTO: {
          if (!need(1)) return false;
          std::uint8_t v = p_[pos_++];
          if (v != 2 && v != 3) return fail(errc::bad_protocol, "protocol " + std::to_string(v));
          break;
        }
        case FRAME: {
          std::size_t len;
          ok = length(8, len);  // framing is only a read-ahead hint: check and ignore it
          break;
        }
        case STOP: return finish(out);
        case NONE: ok = push_leaf(none{}); break;
        case NEWTRUE: ok = push_leaf(true); break;
        case NEWFALSE: ok = push_leaf(false); break;
        case INT: {
          // Protocol 0/1 spell booleans "I01\n"/"I00\n"; other text ints are not accepted.
          std::string_view l;
          if (!line(l)) return false;
          if (l == "01")
            ok = push_leaf(true);
          else if (l == "00")
            ok = push_leaf(false);
          else
            return fail(errc::invalid_value, "INT text form other than I00/I01" + at());
          break;
        }
        case BININT:
          if (!need(4)) return false;
          ok = push_leaf(std::int64_t{static_cast<std::int32_t>(static_cast<std::uint32_t>(le(4)))});
          break;
        case BININT1:
          if (!need(1)) return false;
          ok = push_leaf(static_cast<std::int64_t>(le(1)));
          break;
        case BININT2:
          if (!need(2)) return false;
          ok = push_leaf(static_cast<std::int64_t>(le(2)));
          break;
        case LONG1: {
          std::size_t len;
          ok = length(1, len) && push_long(len);
          break;
        }
        case LONG4: {
          if (!need(4)) return false;
          auto len = static_cast<std::int32_t>(static_cast<std::uint32_t>(le(4)));
          if (len < 0 || static_cast<std::size_t>(len) > max_long4_len)
            return fail(errc::invalid_value, "LONG4 length " + std::to_string(len) + at());
          if (static_cast<std::size_t>(len) > remaining())
            return fail(errc::truncated, "length " + std::to_string(len) + at());
          ok = push_long(static_cast<std::size_t>(len));
          break;
        }
        case BINFLOAT: {
          if (!need(8)) return false;
          std::uint64_t u = 0;
          for (int i = 0; i < 8; ++i) u = (u << 8) | p_[pos_ + i];  // big-endian
          pos_ += 8;
          double d;
          std::memcpy(&d, &u, sizeof d);
          ok = push_leaf(d);
          break;
        }
        case SHORT_BINUNICODE: ok = push_text(1); break;
        case BINUNICODE: ok = push_text(4); break;
        case BINUNICODE8: ok = push_text(8); break;
        case SHORT_BINBYTES: ok = push_bytes(1, false); break;
        case BINBYTES: ok = push_bytes(4, false); break;
        case BINBYTES8: ok = push_bytes(8, false); break;
        case BYTEARRAY8: ok = push_bytes(8, true); break;
        case EMPTY_LIST: ok = push_container(kind::list); break;
        case EMPTY_TUPLE: ok = push_container(kind::tuple); break;
        case EMPTY_DICT: ok = push_container(kind::dict); break;
        case APPEND: ok = append(); break;
        case APPENDS: ok = appends(); break;
        case SETITEM: ok = setitem(); break;
        case SETITEMS: ok = setitems(); break;
        case TUPLE1: ok = have(1) && make_tuple(stack_.size() - 1); break;
        case TUPLE2: ok = have(2) && make_tuple(stack_.size() - 2); break;
        case TUPLE3: ok = have(3) && make_tuple(stack_.size() - 3); break;
        case TUPLE: {
          std::size_t m;
          ok = pop_mark(m) && make_tuple(m);
          break;
        }
        case MARK: marks_.push_back(stack_.size()); break;
        case POP:
          // As CPython: POP with nothing above the fence discards the MARK instead.
          if (stack_.size() > fence())
            stack_.pop_back();
          else if (!marks_.empty())
            marks_.pop_back();
          else
            return fail(errc::stack_error, "stack underflow" + at());
          break;
        case POP_MARK: {
          std::size_t m;
          if (!pop_mark(m)) return false;
          stack_.resize(m);
          break;
        }
        case DUP:
          if (!have(1)) return false;
          stack_.push_back(stack_.back());
          break;
        case BINPUT:
          if (!need(1)) return false;
          ok = put(static_cast<std::uint32_t>(le(1)));
          break;
        case LONG_BINPUT:
          if (!need(4)) return false;
          ok = put(static_cast<std::uint32_t>(le(4)));
          break;
        case MEMOIZE: ok = put(static_cast<std::uint32_t>(memo_.size())); break;
        case BINGET:
          if (!need(1)) return false;
          ok = get(static_cast<std::uint32_t>(le(1)));
          break;
        case LONG_BINGET:
          if (!need(4)) return false;
          ok = get(static_cast<std::uint32_t>(le(4)));
          break;
        case GLOBAL: {
          std::string_view module, name;
          ok = line(module) && line(name) && push_global(module, name);
          break;
        }
        case STACK_GLOBAL: ok = stack_global(); break;
        case REDUCE: ok = reduce(); break;
        default:
          return fail(errc::unknown_opcode,
                      "opcode " + hex_byte(op) + " at offset " + std::to_string(op_pos_));
      }
      if (!ok) return false;
    }
  }

  bool push_long(std::size_t len) {
    // Two's complement little-endian. Normalise away redundant sign bytes so that equal
    // integers always decode to equal values (pickle writes minimal forms; peers may not).
    const std::uint8_t* b = p_ + pos_;
    pos_ += len;
    std::size_t n = len;
    while (n > 1 && ((b[n - 1] == 0x00 && !(b[n - 2] & 0x80)) ||
                     (b[n - 1] == 0xff && (b[n - 2] & 0x80))))
      --n;
    if (n == 1 && b[0] == 0x00) n = 0;
    if (n <= 8) {
      std::uint64_t u = 0;
      for (std::size_t i = 0; i < n; ++i) u |= std::uint64_t{b[i]} << (8 * i);
      if (n > 0 && n < 8 && (b[n - 1] & 0x80)) u |= ~std::uint64_t{0} << (8 * n);  // sign-extend
      return push_leaf(static_cast<std::int64_t>(u));
    }
    return push_leaf(big_int{std::string(reinterpret_cast<const char*>(b), n)});
  }

  bool push_text(std::size_t width) {
    std::size_t len;
    if (!length(width, len)) return false;
    if (!valid_utf8(p_ + pos_, len)) return fail(errc::bad_utf8, "invalid UTF-8" + at());
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return push_leaf(str{std::move(s)});
  }

  bool push_bytes(std::size_t width, bool mutable_) {
    std::size_t len;
    if (!length(width, len)) return false;
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    if (mutable_) return push_leaf(bytearray{std::move(s)});
    return push_leaf(bytes{std::move(s)});
  }

  bool append() {
    if (!have(2)) return false;
    std::uint32_t item = stack_.back();
    std::uint32_t target = stack_[stack_.size() - 2];
    if (nodes_[target].k != kind::list) return fail(errc::stack_error, "APPEND to a non-list" + at());
    if (!item_ok(item)) return false;
    nodes_[target].kids.push_back(item);
    stack_.pop_back();
    return true;
  }

  bool appends() {
    std::size_t m;
    if (!pop_mark(m)) return false;
    if (m <= fence()) return fail(errc::stack_error, "APPENDS without a list" + at());
    std::uint32_t target = stack_[m - 1];
    if (nodes_[target].k != kind::list) return fail(errc::stack_error, "APPENDS to a non-list" + at());
    for (std::size_t i = m; i < stack_.size(); ++i)
      if (!item_ok(stack_[i])) return false;
    auto& kids = nodes_[target].kids;
    kids.insert(kids.end(), stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return true;
  }

  bool setitem() {
    if (!have(3)) return false;
    std::size_t s = stack_.size();
    std::uint32_t target = stack_[s - 3], key = stack_[s - 2], val = stack_[s - 1];
    if (nodes_[target].k != kind::dict) return fail(errc::stack_error, "SETITEM to a non-dict" + at());
    if (!key_ok(key) || !item_ok(val)) return false;
    auto& kids = nodes_[target].kids;
    kids.push_back(key);
    kids.push_back(val);
    stack_.resize(s - 2);
    return true;
  }

  bool setitems() {
    std::size_t m;
    if (!pop_mark(m)) return false;
    if (m <= fence()) return fail(errc::stack_error, "SETITEMS without a dict" + at());
    if ((stack_.size() - m) % 2 != 0)
      return fail(errc::stack_error, "odd number of items for SETITEMS" + at());
    std::uint32_t target = stack_[m - 1];
    if (nodes_[target].k != kind::dict) return fail(errc::stack_error, "SETITEMS to a non-dict" + at());
    for (std::size_t i = m; i < stack_.size(); i += 2)
      if (!key_ok(stack_[i]) || !item_ok(stack_[i + 1])) return false;
    auto& kids = nodes_[target].kids;
    kids.insert(kids.end(), stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return true;
  }

  /// Replace stack_[from..] by one tuple of those items.
  bool make_tuple(std::size_t from) {
    node nd;
    nd.k = kind::tuple;
    nd.hashable = true;
    nd.kids.assign(stack_.begin() + static_cast<std::ptrdiff_t>(from), stack_.end());
    for (std::uint32_t kid : nd.kids) {
      if (!item_ok(kid)) return false;
      // A tuple's items are fixed at creation, so hashability is known now (O(items)).
      nd.hashable = nd.hashable && nodes_[kid].hashable;
    }
    stack_.resize(from);
    return push_node(std::move(nd));
  }

  bool put(std::uint32_t key) {
    if (!have(1)) return false;
    // Store the node index, not a copy: later APPENDs to this list are seen by BINGETs.
    memo_[key] = stack_.back();
    return true;
  }

  bool get(std::uint32_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) return fail(errc::bad_memo, "memo slot " + std::to_string(key) + at());
    stack_.push_back(it->second);
    return true;
  }

  bool push_global(std::string_view module, std::string_view name) {
    for (const auto& g : allowed_globals) {
      if (g.module == module && g.name == name) {
        node nd;
        nd.k = kind::callable;
        nd.fn = g.id;
        nd.hashable = false;
        return push_node(std::move(nd));
      }
    }
    return fail(errc::forbidden_global, "global " + printable(module) + "." + printable(name));
  }

  bool stack_global() {
    if (!have(2)) return false;
    std::uint32_t name = stack_.back(), module = stack_[stack_.size() - 2];
    if (!leaf_is(name, str{}) || !leaf_is(module, str{}))
      return fail(errc::invalid_value, "STACK_GLOBAL of non-str" + at());
    // Copy the names out: push_global() may grow nodes_ and invalidate references.
    std::string m = nodes_[module].leaf.as<str>().utf8;
    std::string n = nodes_[name].leaf.as<str>().utf8;
    stack_.resize(stack_.size() - 2);
    return push_global(m, n);
  }

  // ---- REDUCE: allowed callables with exactly their argument shapes ---------------------

  bool int_arg(std::uint32_t idx, std::int64_t& out) const {
    const node& nd = nodes_[idx];
    if (nd.k != kind::leaf || !nd.leaf.is<std::int64_t>()) return false;  // bool is not int here
    out = nd.leaf.as<std::int64_t>();
    return true;
  }

  bool charge(std::size_t units) {
    spent_ += units;
    if (spent_ > budget_)
      return fail(errc::too_many_nodes, "node budget of " + std::to_string(budget_) + " exceeded");
    return true;
  }

  bool reduce() {
    if (!have(2)) return false;
    std::uint32_t args = stack_.back(), fn = stack_[stack_.size() - 2];
    if (nodes_[fn].k != kind::callable) return fail(errc::bad_reduce, "REDUCE of a non-callable" + at());
    if (nodes_[args].k != kind::tuple) return fail(errc::bad_reduce, "REDUCE arguments not a tuple" + at());
    // No allowed callable takes more than two arguments; refusing bigger tuples first
    // also means no work proportional to a (possibly memo-shared) huge tuple.
    if (nodes_[args].kids.size() > 2) return fail(errc::bad_reduce, "too many REDUCE arguments" + at());
    // Copy the (at most two) indices: push_node() below may reallocate nodes_.
    struct {
      std::uint32_t v[2] = {0, 0};
      std::size_t n = 0;
      std::size_t size() const noexcept { return n; }
      bool empty() const noexcept { return n == 0; }
      std::uint32_t operator[](std::size_t i) const noexcept { return v[i]; }
    } a;
    for (std::uint32_t kid : nodes_[args].kids) a.v[a.n++] = kid;
    callable_id id = nodes_[fn].fn;
    stack_.resize(stack_.size() - 2);

    auto bad = [&](const char* what) { return fail(errc::bad_reduce, std::string(what) + at()); };
    auto wrap = [&](kind k, bool hashable) {
      node nd;
      nd.k = k;
      nd.hashable = hashable;
      nd.kids.push_back(a[0]);
      return push_node(std::move(nd));
    };

    switch (id) {
      case callable_id::kwargs: {
        if (a.size() != 1 || nodes_[a[0]].k != kind::dict) return bad("Kwargs expects (dict,)");
        // Kwargs(d) copies d: later SETITEMs on d (through the memo) must not show through.
        node nd;
        nd.k = kind::kwargs;
        nd.hashable = false;
        nd.kids = nodes_[a[0]].kids;
        if (!charge(nd.kids.size())) return false;
        return push_node(std::move(nd));
      }
      case callable_id::blob:
        if (a.size() != 1 || !leaf_is(a[0], bytes{})) return bad("Blob expects (bytes,)");
        return wrap(kind::blob_of, true);
      case callable_id::secret:
        if (a.size() != 1 || !leaf_is(a[0], str{})) return bad("Secret expects (str,)");
        return wrap(kind::secret_of, true);
      case callable_id::call_error:
        if (a.size() != 1 || !leaf_is(a[0], str{})) return bad("CallError expects (str,)");
        return wrap(kind::call_error_of, true);
      case callable_id::bytearray:
        if (a.empty()) return push_leaf(bytearray{});
        if (a.size() != 1 || !leaf_is(a[0], bytes{})) return bad("bytearray expects () or (bytes,)");
        return wrap(kind::bytearray_of, false);
      case callable_id::bytes:
        if (!a.empty()) return bad("bytes expects ()");
        return push_leaf(bytes{});
      case callable_id::dead:
        if (!a.empty()) return bad("_DEAD expects ()");
        return push_leaf(dead{});
      case callable_id::context: {
        std::int64_t id_ = 0;
        if (a.size() != 2 || !int_arg(a[0], id_) ||
            !(leaf_is(a[1], str{}) || leaf_is(a[1], none{})))
          return bad("_unpickle_context expects (int, str or None)");
        if (id_ < 0 || id_ > std::numeric_limits<std::uint32_t>::max())
          return bad("_unpickle_context: context id out of range");
        context_ref c;
        c.context_id = static_cast<std::uint32_t>(id_);
        if (leaf_is(a[1], str{})) {
          const std::string& name = nodes_[a[1]].leaf.as<str>().utf8;
          if (!charge(1 + name.size() / 8)) return false;  // a copy of a possibly shared string
          c.name = name;
        }
        return push_leaf(std::move(c));
      }
      case callable_id::sender: {
        std::int64_t ctx = 0, handle = 0;
        if (a.size() != 2 || !int_arg(a[0], ctx) || !int_arg(a[1], handle))
          return bad("_unpickle_sender expects (int, int)");
        constexpr std::int64_t u32_max = std::numeric_limits<std::uint32_t>::max();
        if (ctx < 0 || ctx > u32_max || handle <= 0 || handle > u32_max)
          return bad("_unpickle_sender: id out of range");
        return push_leaf(sender_ref{static_cast<std::uint32_t>(ctx), static_cast<std::uint32_t>(handle)});
      }
      case callable_id::codecs_encode: {
        if (a.size() != 2 || !leaf_is(a[0], str{}) || !leaf_is(a[1], str{}))
          return bad("_codecs.encode expects (str, 'latin1')");
        const std::string& enc = nodes_[a[1]].leaf.as<str>().utf8;
        if (enc != "latin1" && enc != "latin-1") return bad("_codecs.encode: encoding not latin1");
        const std::string& text = nodes_[a[0]].leaf.as<str>().utf8;
        // A new string as big as the (possibly memo-shared) text: charge it.
        if (!charge(1 + text.size() / 8)) return false;
        std::string out;
        if (!utf8_to_latin1(text, out)) return bad("_codecs.encode: text not latin-1");
        return push_leaf(bytes{std::move(out)});
      }
    }
    return bad("unhandled callable");
  }

  // ---- STOP: check the stack, then build the value tree ---------------------------------

  bool finish(value& out) {
    if (!marks_.empty() || stack_.size() != 1)
      return fail(errc::stack_error, "stack holds " + std::to_string(stack_.size()) +
                                         " items and " + std::to_string(marks_.size()) +
                                         " marks at STOP" + at());
    std::uint32_t root = stack_[0];
    if (!item_ok(root)) return false;
    if (pos_ != n_)
      return fail(errc::trailing_data, std::to_string(n_ - pos_) + " bytes after STOP" + at());
    count_visits(root);
    return materialize(root, out);
  }

  /// Mark how often each node will be visited from `root` (1 or "2 or more"), so that
  /// nodes reached once can be moved into the result rather than copied. Each node is
  /// expanded at most twice, so this is linear even for memo bombs and cycles.
  void count_visits(std::uint32_t root) {
    std::vector<std::uint32_t> todo{root};
    while (!todo.empty()) {
      node& nd = nodes_[todo.back()];
      todo.pop_back();
      if (nd.visits >= 2) continue;
      ++nd.visits;
      todo.insert(todo.end(), nd.kids.begin(), nd.kids.end());
    }
  }

  /// Value of a leaf node: moved if this is its only visit, else copied (and charged).
  bool take_leaf(node& nd, value& out) {
    if (nd.visits == 1) {
      out = std::move(nd.leaf);
      return true;
    }
    if (!charge(leaf_bytes(nd.leaf) / 8)) return false;
    out = nd.leaf;
    return true;
  }

  /// The string inside a bytes/str leaf (the only kids *_of wrappers have).
  bool take_string(std::uint32_t idx, std::string& out) {
    value v;
    if (!charge(1) || !take_leaf(nodes_[idx], v)) return false;
    if (auto* b = std::get_if<bytes>(&v.get()))
      out = std::move(b->data);
    else
      out = std::move(v.as<str>().utf8);
    return true;
  }

  struct frame {
    std::uint32_t n;
    std::size_t next = 0;  ///< next kid to visit
    value v;               ///< the container being filled
    value key;             ///< dict key waiting for its value
  };

  /// Build the value tree of `root` iteratively, copying shared subtrees.
  bool materialize(std::uint32_t root, value& out) {
    std::vector<frame> frames;
    value done;  // the value just completed, to be attached to frames.back()

    // Visit node `idx`: either completes it into `done` (returns 1) or opens a frame (0).
    auto visit = [&](std::uint32_t idx) -> int {
      if (!charge(1)) return -1;
      node& nd = nodes_[idx];
      switch (nd.k) {
        case kind::leaf: return take_leaf(nd, done) ? 1 : -1;
        case kind::callable:
          fail(errc::invalid_value, "callable used as a value");
          return -1;
        case kind::blob_of:
        case kind::secret_of:
        case kind::call_error_of:
        case kind::bytearray_of: {
          std::string s;
          kind k = nd.k;
          if (!take_string(nd.kids[0], s)) return -1;
          if (k == kind::blob_of)
            done = blob{std::move(s)};
          else if (k == kind::secret_of)
            done = secret{std::move(s)};
          else if (k == kind::call_error_of)
            done = call_error{std::move(s)};
          else
            done = bytearray{std::move(s)};
          return 1;
        }
        case kind::list:
        case kind::tuple:
        case kind::dict:
        case kind::kwargs: {
          if (nd.active) {
            fail(errc::invalid_value, "self-referential container");
            return -1;
          }
          if (frames.size() + 1 > max_depth_) {
            fail(errc::too_deep, "nesting deeper than " + std::to_string(max_depth_));
            return -1;
          }
          nd.active = true;
          frame f;
          f.n = idx;
          // Reserving is safe: kids were all paid for by input bytes or charge().
          if (nd.k == kind::list) {
            list l;
            l.items.reserve(nd.kids.size());
            f.v = std::move(l);
          } else if (nd.k == kind::tuple) {
            tuple t;
            t.items.reserve(nd.kids.size());
            f.v = std::move(t);
          } else if (nd.k == kind::dict) {
            dict d;
            d.items.reserve(nd.kids.size() / 2);
            f.v = std::move(d);
          } else {
            kwargs k;
            k.items.reserve(nd.kids.size() / 2);
            f.v = std::move(k);
          }
          frames.push_back(std::move(f));
          return 0;
        }
      }
      return -1;
    };

    // Attach `done` to the innermost open container.
    auto attach = [&]() {
      frame& f = frames.back();
      std::size_t i = f.next - 1;  // index of the kid `done` came from
      auto& s = f.v.get();
      if (auto* l = std::get_if<list>(&s)) {
        l->items.push_back(std::move(done));
      } else if (auto* t = std::get_if<tuple>(&s)) {
        t->items.push_back(std::move(done));
      } else if (i % 2 == 0) {
        f.key = std::move(done);
      } else if (auto* d = std::get_if<dict>(&s)) {
        d->items.emplace_back(std::move(f.key), std::move(done));
      } else {
        std::get<kwargs>(s).items.emplace_back(std::move(f.key), std::move(done));
      }
    };

    int r = visit(root);
    if (r < 0) return false;
    if (r == 1) {
      out = std::move(done);
      return true;
    }
    while (!frames.empty()) {
      frame& f = frames.back();
      node& nd = nodes_[f.n];
      if (f.next < nd.kids.size()) {
        std::uint32_t kid = nd.kids[f.next++];
        r = visit(kid);  // may push a frame: `f` is not used after this
        if (r < 0) return false;
        if (r == 1) attach();
        continue;
      }
      nd.active = false;
      done = std::move(f.v);
      frames.pop_back();
      if (frames.empty()) {
        out = std::move(done);
        return true;
      }
      attach();
    }
    return false;  // unreachable
  }

  const std::uint8_t* p_;
  std::size_t n_;
  std::size_t pos_ = 0;
  std::size_t op_pos_ = 0;  ///< offset of the opcode being decoded, for error details
  std::size_t max_depth_;
  std::size_t budget_;
  std::size_t spent_ = 0;
  std::vector<node> nodes_;
  std::vector<std::uint32_t> stack_;
  std::vector<std::size_t> marks_;  ///< stack positions of open MARKs
  std::unordered_map<std::uint32_t, std::uint32_t> memo_;  ///< memo key -> node index
  errc err_ = errc::invalid_value;
  std::string detail_;
};

/// A pickle that is one scalar and nothing else (None, a bool, an int of up to four
/// bytes: the result of most calls, the no-op call's pid): its value, without making
/// a decoder (whose arena and stacks cost a few allocations). The decoder gives the
/// same value for exactly these bytes; anything else, errors included, is left to it.
std::optional<value> decode_scalar(std::span<const std::uint8_t> d) {
  std::size_t i = 0;
  if (d.size() >= 2 && d[0] == PROTO) {
    if (d[1] != 2 && d[1] != 3) return std::nullopt;
    i = 2;
  }
  if (i >= d.size()) return std::nullopt;
  const std::uint8_t op = d[i++];
  std::size_t len = 0;  // the opcode's argument bytes
  if (op == BININT1) len = 1;
  else if (op == BININT2) len = 2;
  else if (op == BININT) len = 4;
  else if (op != NONE && op != NEWTRUE && op != NEWFALSE) return std::nullopt;
  if (d.size() != i + len + 1 || d[i + len] != STOP) return std::nullopt;
  std::uint32_t u = 0;
  for (std::size_t k = 0; k < len; ++k) u |= std::uint32_t{d[i + k]} << (8 * k);  // little-endian
  switch (op) {
    case NONE: return value{none{}};
    case NEWTRUE: return value{true};
    case NEWFALSE: return value{false};
    case BININT: return value{std::int64_t{static_cast<std::int32_t>(u)}};
    default: return value{static_cast<std::int64_t>(u)};
  }
}

}  // namespace

decode_result decode(std::span<const std::uint8_t> data, const decode_limits& limits) {
  if (auto v = decode_scalar(data)) return decode_result{std::move(*v), {}, {}};
  decoder d(data, limits);
  return d.run();
}

}  // namespace mitogen::wire
