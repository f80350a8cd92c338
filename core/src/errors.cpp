#include "mitogen/errors.hpp"

namespace mitogen {
namespace {

class category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "mitogen"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::child_died: return "the context disconnected";
      case errc::protocol_error: return "protocol error";
      case errc::broker_shut_down: return "the broker was shut down";
      case errc::no_route: return "no route to the context";
      case errc::timed_out: return "timed out";
    }
    return "unknown mitogen error";
  }
};

}  // namespace

const std::error_category& mitogen_category() noexcept {
  static const category c;
  return c;
}

call_error::call_error(std::string text) : error(text), text_(std::move(text)) {
  // "<module>.<Class>: <message>\n<traceback>"
  auto nl = text_.find('\n');
  std::string head = text_.substr(0, nl);
  if (nl != std::string::npos) traceback_ = text_.substr(nl + 1);
  auto colon = head.find(": ");
  if (colon != std::string::npos && head.find(' ') > colon) {
    type_name_ = head.substr(0, colon);
    message_ = head.substr(colon + 2);
  } else {
    message_ = head;
  }
}

}  // namespace mitogen
