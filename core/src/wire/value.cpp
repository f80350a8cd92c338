// describe(): a short, log-safe summary of a value.
#include "mitogen/wire/value.hpp"

#include <string>

namespace mitogen::wire {
namespace {

template <class... F>
struct overloaded : F... {
  using F::operator()...;
};
template <class... F>
overloaded(F...) -> overloaded<F...>;

std::string sized(const char* what, std::size_t n) { return std::string(what) + " of " + std::to_string(n); }

}  // namespace

std::string describe(const value& v) {
  // Only types and sizes: values may hold secrets, credentials or megabytes of data,
  // none of which belong in a log line.
  return std::visit(
      overloaded{
          [](const none&) -> std::string { return "None"; },
          [](const bool&) -> std::string { return "bool"; },
          [](const std::int64_t&) -> std::string { return "int"; },
          [](const big_int& b) -> std::string { return sized("int", b.le_bytes.size()) + " bytes"; },
          [](const double&) -> std::string { return "float"; },
          [](const bytes& b) -> std::string { return sized("bytes", b.data.size()); },
          [](const bytearray& b) -> std::string { return sized("bytearray", b.data.size()); },
          [](const blob& b) -> std::string {
            return "[blob: " + std::to_string(b.data.size()) + " bytes]";
          },
          [](const str& s) -> std::string { return sized("str", s.utf8.size()) + " bytes"; },
          [](const secret&) -> std::string { return "[secret]"; },
          [](const list& l) -> std::string { return sized("list", l.items.size()); },
          [](const tuple& t) -> std::string { return sized("tuple", t.items.size()); },
          [](const dict& d) -> std::string { return sized("dict", d.items.size()); },
          [](const kwargs& k) -> std::string { return sized("kwargs", k.items.size()); },
          [](const call_error&) -> std::string { return "CallError"; },
          [](const context_ref& c) -> std::string {
            return "context " + std::to_string(c.context_id);
          },
          [](const sender_ref& s) -> std::string {
            return "sender " + std::to_string(s.context_id) + "/" + std::to_string(s.handle);
          },
          [](const dead&) -> std::string { return "dead"; },
      },
      v.get());
}

}  // namespace mitogen::wire
