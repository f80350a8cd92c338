#include "mitogen/mux/protocol.hpp"

#include "mitogen/context/connection_stack.hpp"
#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen::mux {
namespace {

const wire::value* find(const wire::dict& d, const char* key) {
  for (auto& [k, v] : d.items)
    if (k.is<wire::str>() && k.as<wire::str>().utf8 == key) return &v;
  return nullptr;
}

}  // namespace

std::string encode_hello(const hello& h) {
  wire::dict d;
  d.items.emplace_back(wire::str{"context_id"}, static_cast<std::int64_t>(h.context_id));
  d.items.emplace_back(wire::str{"version"}, h.version);
  d.items.emplace_back(wire::str{"pid"}, h.pid);
  return wire::encode(wire::value(std::move(d)));
}

std::optional<hello> decode_hello(const std::string& data) {
  auto r = wire::decode(data);
  if (!r || !r.v.is<wire::dict>()) return std::nullopt;
  const auto& d = r.v.as<wire::dict>();
  const auto* id = find(d, "context_id");
  const auto* version = find(d, "version");
  const auto* pid = find(d, "pid");
  if (!id || !version || !pid || !id->is<std::int64_t>() || !version->is<std::int64_t>() || !pid->is<std::int64_t>())
    return std::nullopt;
  const auto n = id->as<std::int64_t>();
  if (n <= 0 || n > 0xffffffffLL) return std::nullopt;
  return hello{static_cast<std::uint32_t>(n), version->as<std::int64_t>(), pid->as<std::int64_t>()};
}

std::string error_kind(std::error_code ec) {
  const char* name = error_name(ec);
  return name ? name : "error";
}

std::string encode_error(const std::string& kind, const std::string& message) {
  wire::dict d;
  d.items.emplace_back(wire::str{"error"}, wire::str{kind});
  d.items.emplace_back(wire::str{"message"}, wire::str{message});
  return wire::encode(wire::value(std::move(d)));
}

std::string encode_connected(std::uint32_t context_id, const std::string& name) {
  wire::tuple t;
  t.items.emplace_back(static_cast<std::int64_t>(context_id));
  t.items.emplace_back(wire::str{name});
  return wire::encode(wire::value(std::move(t)));
}

wire::value decode_reply(const wire::message& m) {
  if (m.is_dead())
    throw channel_error(m.data.empty() ? std::string("mitogen-mux: the daemon went away") : "mitogen-mux: " + m.data);
  auto r = wire::decode(m.data);
  if (!r)
    throw stream_error(make_error_code(errc::protocol_error), "mitogen-mux: undecodable reply: " + r.ec.message());
  if (r.v.is<wire::dict>()) {
    const auto& d = r.v.as<wire::dict>();
    const auto* kind = find(d, "error");
    if (kind && kind->is<wire::str>()) {
      const auto* msg = find(d, "message");
      std::string text = msg && msg->is<wire::str>() ? msg->as<wire::str>().utf8 : "error";
      const std::string& k = kind->as<wire::str>().utf8;
      if (auto ec = error_from_name(k)) throw stream_error(ec, text);
      if (k == "bad_request") throw stack_error(text);
      throw error(text);
    }
  }
  return std::move(r.v);
}

}  // namespace mitogen::mux
