#pragma once
/// The values that may cross the wire: the seed's serialization rules as a C++ tree.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace mitogen::wire {

class value;

/// Python `None`.
struct none {
  bool operator==(const none&) const = default;
};
/// Python `int` outside int64: two's complement, little-endian, minimal length
/// (exactly pickle's LONG1/LONG4 body).
struct big_int {
  std::string le_bytes;
  bool operator==(const big_int&) const = default;
};
/// Python `bytes`.
struct bytes {
  std::string data;
  bool operator==(const bytes&) const = default;
};
/// Python `bytearray`.
struct bytearray {
  std::string data;
  bool operator==(const bytearray&) const = default;
};
/// `mitogen.core.Blob` (bytes shown as a size in logs).
struct blob {
  std::string data;
  bool operator==(const blob&) const = default;
};
/// Python `str`, UTF-8.
struct str {
  std::string utf8;
  bool operator==(const str&) const = default;
};
/// `mitogen.core.Secret` (str masked in logs), UTF-8.
struct secret {
  std::string utf8;
  bool operator==(const secret&) const = default;
};
/// Python `list`.
struct list {
  std::vector<value> items;
  bool operator==(const list&) const;
};
/// Python `tuple`.
struct tuple {
  std::vector<value> items;
  bool operator==(const tuple&) const;
};
/// Python `dict` (insertion order kept).
struct dict {
  std::vector<std::pair<value, value>> items;
  bool operator==(const dict&) const;
};
/// `mitogen.core.Kwargs`: a dict of keyword arguments.
struct kwargs {
  std::vector<std::pair<value, value>> items;
  bool operator==(const kwargs&) const;
};
/// `mitogen.core.CallError`: "<module>.<Class>: <message>\n<traceback>".
struct call_error {
  std::string message;
  bool operator==(const call_error&) const = default;
};
/// `mitogen.core.Context` reference.
struct context_ref {
  std::uint32_t context_id = 0;
  std::optional<std::string> name;
  bool operator==(const context_ref&) const = default;
};
/// `mitogen.core.Sender` reference.
struct sender_ref {
  std::uint32_t context_id = 0;
  std::uint32_t handle = 0;
  bool operator==(const sender_ref&) const = default;
};
/// `mitogen.core._DEAD` marker.
struct dead {
  bool operator==(const dead&) const = default;
};

/// A decoded or to-be-encoded value. Regular value type (copyable, movable).
class value {
 public:
  using storage = std::variant<none, bool, std::int64_t, big_int, double, bytes, bytearray, blob,
                               str, secret, list, tuple, dict, kwargs, call_error, context_ref,
                               sender_ref, dead>;

  value() = default;
  template <class T, class = std::enable_if_t<std::is_constructible_v<storage, T&&> &&
                                              !std::is_same_v<std::decay_t<T>, value>>>
  value(T&& v) : v_(std::forward<T>(v)) {}  // NOLINT: implicit by design
  value(int v) : v_(std::int64_t{v}) {}      // NOLINT
  value(const char* s) : v_(str{s}) {}      // NOLINT: text literal means str

  const storage& get() const noexcept { return v_; }
  storage& get() noexcept { return v_; }

  template <class T> bool is() const noexcept { return std::holds_alternative<T>(v_); }
  template <class T> const T& as() const { return std::get<T>(v_); }
  template <class T> T& as() { return std::get<T>(v_); }

  bool operator==(const value& o) const { return v_ == o.v_; }

 private:
  storage v_;
};

inline bool list::operator==(const list& o) const { return items == o.items; }
inline bool tuple::operator==(const tuple& o) const { return items == o.items; }
inline bool dict::operator==(const dict& o) const { return items == o.items; }
inline bool kwargs::operator==(const kwargs& o) const { return items == o.items; }

/// Short human description for logs and errors ("list of 3", "str", ...). Never prints secrets.
std::string describe(const value& v);

}  // namespace mitogen::wire
