#pragma once
// Helpers shared by the wire tests: terse value builders, hex, and a repr for Catch2.
#include <catch2/catch.hpp>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "mitogen/wire/pickle.hpp"
#include "mitogen/wire/value.hpp"

namespace wire_test {

namespace w = mitogen::wire;

inline w::value I(std::int64_t i) { return w::value(i); }
inline w::value S(std::string s) { return w::str{std::move(s)}; }
inline w::value B(std::string s) { return w::bytes{std::move(s)}; }
inline w::value L(std::initializer_list<w::value> xs) { return w::list{std::vector<w::value>(xs)}; }
inline w::value T(std::initializer_list<w::value> xs) { return w::tuple{std::vector<w::value>(xs)}; }
inline w::value D(std::initializer_list<std::pair<w::value, w::value>> kvs) {
  return w::dict{std::vector<std::pair<w::value, w::value>>(kvs)};
}
inline w::value K(std::initializer_list<std::pair<w::value, w::value>> kvs) {
  return w::kwargs{std::vector<std::pair<w::value, w::value>>(kvs)};
}

/// +/- 2**k as pickle's minimal little-endian two's complement (k >= 64).
inline w::value pow2(unsigned k, bool negative = false) {
  std::string le(k / 8, '\0');
  unsigned bit = k % 8;
  if (!negative) {
    le.push_back(static_cast<char>(1u << bit));
    if (bit == 7) le.push_back('\0');  // keep it positive
  } else {
    le.push_back(static_cast<char>(256u - (1u << bit)));
  }
  return w::big_int{std::move(le)};
}

inline std::string unhex(const std::string& h) {
  std::string out;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

inline std::string hex(const std::string& s) {
  static const char d[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

/// Debug rendering of a value (tests only: shows secrets).
inline void repr(const w::value& v, std::ostream& os) {
  std::visit(
      [&](const auto& x) {
        using X = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<X, w::none>) os << "None";
        else if constexpr (std::is_same_v<X, bool>) os << (x ? "True" : "False");
        else if constexpr (std::is_same_v<X, std::int64_t>) os << x;
        else if constexpr (std::is_same_v<X, double>) os << x;
        else if constexpr (std::is_same_v<X, w::big_int>) os << "big_int(" << hex(x.le_bytes) << ")";
        else if constexpr (std::is_same_v<X, w::bytes>) os << "b'" << hex(x.data.substr(0, 64)) << "'[" << x.data.size() << "]";
        else if constexpr (std::is_same_v<X, w::bytearray>) os << "bytearray(" << hex(x.data.substr(0, 64)) << ")[" << x.data.size() << "]";
        else if constexpr (std::is_same_v<X, w::blob>) os << "Blob(" << hex(x.data.substr(0, 64)) << ")";
        else if constexpr (std::is_same_v<X, w::str>) os << "'" << x.utf8.substr(0, 64) << "'";
        else if constexpr (std::is_same_v<X, w::secret>) os << "Secret('" << x.utf8 << "')";
        else if constexpr (std::is_same_v<X, w::call_error>) os << "CallError(" << x.message << ")";
        else if constexpr (std::is_same_v<X, w::context_ref>) os << "Context(" << x.context_id << ", " << (x.name ? *x.name : "None") << ")";
        else if constexpr (std::is_same_v<X, w::sender_ref>) os << "Sender(" << x.context_id << ", " << x.handle << ")";
        else if constexpr (std::is_same_v<X, w::dead>) os << "_DEAD()";
        else if constexpr (std::is_same_v<X, w::list> || std::is_same_v<X, w::tuple>) {
          os << (std::is_same_v<X, w::list> ? "[" : "(");
          std::size_t i = 0;
          for (const auto& it : x.items) {
            if (i++) os << ", ";
            if (i > 20) { os << "..."; break; }
            repr(it, os);
          }
          os << (std::is_same_v<X, w::list> ? "]" : ")");
        } else {
          os << (std::is_same_v<X, w::kwargs> ? "Kwargs{" : "{");
          std::size_t i = 0;
          for (const auto& [k, val] : x.items) {
            if (i++) os << ", ";
            if (i > 20) { os << "..."; break; }
            repr(k, os);
            os << ": ";
            repr(val, os);
          }
          os << "}";
        }
      },
      v.get());
}

/// Decode and require success.
inline w::value must_decode(const std::string& data) {
  auto r = w::decode(data);
  INFO("decode error: " << r.ec.message() << " (" << r.detail << ")");
  REQUIRE(r);
  return r.v;
}

}  // namespace wire_test

namespace Catch {
template <>
struct StringMaker<mitogen::wire::value> {
  static std::string convert(const mitogen::wire::value& v) {
    std::ostringstream os;
    wire_test::repr(v, os);
    return os.str();
  }
};
}  // namespace Catch
