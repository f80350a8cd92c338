// The "mitogen.wire" error category.
#include "mitogen/wire/error.hpp"

namespace mitogen::wire {
namespace {

class wire_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "mitogen.wire"; }

  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::bad_magic: return "bad frame magic";
      case errc::message_too_large: return "message too large";
      case errc::truncated: return "truncated input";
      case errc::unknown_opcode: return "pickle opcode not allowed";
      case errc::forbidden_global: return "pickle global not allowed";
      case errc::bad_reduce: return "pickle REDUCE with wrong arguments";
      case errc::too_deep: return "value nested too deeply";
      case errc::too_many_nodes: return "value too large (node budget exceeded)";
      case errc::stack_error: return "pickle stack error";
      case errc::bad_memo: return "pickle memo reference to an unset slot";
      case errc::bad_utf8: return "text is not valid UTF-8";
      case errc::unhashable_key: return "unhashable dict key";
      case errc::trailing_data: return "data after pickle STOP";
      case errc::bad_protocol: return "unsupported pickle protocol";
      case errc::invalid_value: return "invalid value";
    }
    return "unknown mitogen.wire error " + std::to_string(ev);
  }
};

}  // namespace

const std::error_category& wire_category() noexcept {
  // A function-local static: one category object per process, so error_code
  // comparisons (which compare category addresses) work across translation units.
  static const wire_category_impl category;
  return category;
}

}  // namespace mitogen::wire
