#pragma once
/// Errors of the core: error codes inside, exceptions at the API edge.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>

namespace mitogen {

/// Conditions of the io and routing layers callers must react to. Category
/// "mitogen". Why a connection failed is layer 4's (mitogen/context/errors.hpp).
enum class errc {
  child_died = 1,      ///< the context's process exited or its stream closed
  protocol_error,      ///< the peer broke framing or the codec rules
  broker_shut_down,    ///< the broker (or router) was shut down
  no_route,            ///< no stream leads to the destination context
  timed_out,           ///< a call's deadline passed
};

/// The "mitogen" error category.
const std::error_category& mitogen_category() noexcept;
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), mitogen_category()};
}

/// Base of all exceptions thrown by the public API.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A remote call raised: carries the remote exception type, message and traceback.
class call_error : public error {
 public:
  /// `text` is the wire form: "<module>.<Class>: <message>\n<traceback>".
  explicit call_error(std::string text);
  const std::string& type_name() const noexcept { return type_name_; }
  const std::string& remote_message() const noexcept { return message_; }
  const std::string& remote_traceback() const noexcept { return traceback_; }
  const std::string& text() const noexcept { return text_; }

 private:
  std::string text_, type_name_, message_, traceback_;
};

/// A channel died: the context disconnected, or the message could not be delivered.
class channel_error : public error {
 public:
  using error::error;
};

/// A context could not be established, or a stream broke.
class stream_error : public error {
 public:
  stream_error(std::error_code ec, const std::string& what) : error(what), ec_(ec) {}
  std::error_code code() const noexcept { return ec_; }

 private:
  std::error_code ec_;
};

/// A deadline passed.
class timeout_error : public error {
 public:
  using error::error;
};

}  // namespace mitogen

template <>
struct std::is_error_code_enum<mitogen::errc> : std::true_type {};
