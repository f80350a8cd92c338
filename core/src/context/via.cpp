#include "via.hpp"

#include "bootstrap.hpp"
#include "mitogen/context/errors.hpp"
#include "mitogen/errors.hpp"

namespace mitogen::detail {
namespace {

const wire::value* find(const wire::dict& d, const char* key) {
  for (auto& [k, v] : d.items)
    if (k.is<wire::str>() && k.as<wire::str>().utf8 == key) return &v;
  return nullptr;
}

/// The code of a failure the intermediary names (a child: only why connecting
/// failed, or that the child died, is taken from it; anything else is a failed
/// bootstrap).
std::error_code code_named(const std::string& s) {
  const std::error_code ec = error_from_name(s);
  if (ec.category() == connect_category() || ec == errc::child_died) return ec;
  return make_error_code(connect_errc::bootstrap_failed);
}

}  // namespace

context connect_via(router& r, const connect_options& o, const std::string& method, wire::dict opts,
                    std::function<std::error_code(std::error_code, const std::string&)> classify) {
  check_can_connect(r, method.c_str());
  const context& via = *o.via;
  if (via.get_router().get() != &r) throw error("mitogen: via= names a context of another router");
  const std::uint32_t id = r.allocate_id_via(via.id());

  auto put = [&](const char* k, wire::value v) { opts.items.emplace_back(wire::str{k}, std::move(v)); };
  if (!o.python_path.empty()) {
    wire::list py;
    for (auto& a : o.python_path) py.items.emplace_back(wire::str{a});
    put("python_path", std::move(py));
  }
  put("remote_name", wire::str{o.remote_name.value_or(default_remote_name())});
  put("connect_timeout", static_cast<double>(o.connect_timeout.count()) / 1000.0);
  put("debug", o.debug);
  put("log_level", static_cast<std::int64_t>(o.log_level));
  put("max_message_size", static_cast<std::int64_t>(o.max_message_size));

  call_spec spec{.module = "mitogen.core", .function = "_proxy_connect", .class_name = std::nullopt, .args = {}, .kwargs = {}};
  spec.args.items.emplace_back(wire::str{method});
  spec.args.items.emplace_back(std::move(opts));
  spec.kwargs.items.emplace_back(wire::str{"context_id"}, static_cast<std::int64_t>(id));

  const std::string what = "mitogen: context via " + via.name() + " failed to start: ";
  wire::value reply;
  try {
    // The agent bounds the bootstrap by connect_timeout itself; the margin covers
    // spawning and the round trip.
    reply = via.call(std::move(spec), o.connect_timeout + std::chrono::seconds(10));
  } catch (const call_error& e) {
    throw stream_error(make_error_code(connect_errc::bootstrap_failed), what + e.what());
  } catch (const channel_error& e) {
    throw stream_error(make_error_code(errc::child_died), what + e.what());
  } catch (const timeout_error& e) {
    throw stream_error(make_error_code(connect_errc::connect_timeout), what + "no answer within the connect timeout");
  }
  if (!reply.is<wire::dict>()) throw stream_error(make_error_code(errc::protocol_error), what + "bad _proxy_connect reply");
  const auto& d = reply.as<wire::dict>();
  const auto* msg = find(d, "msg");
  if (msg && msg->is<wire::str>()) {
    const auto* code = find(d, "code");
    std::error_code ec = code_named(code && code->is<wire::str>() ? code->as<wire::str>().utf8 : "");
    const std::string& text = msg->as<wire::str>().utf8;
    if (classify) ec = classify(ec, text);
    throw stream_error(ec, "mitogen: " + text);
  }
  const auto* got = find(d, "id");
  const auto* name = find(d, "name");
  if (!got || !got->is<std::int64_t>() || got->as<std::int64_t>() != id || !name || !name->is<wire::str>())
    throw stream_error(make_error_code(errc::protocol_error), what + "bad _proxy_connect reply");
  // The agent's ADD_ROUTE travels ahead of its reply on the same stream, so the
  // route exists now unless it was refused.
  if (r.routed_via(id) == 0)
    throw stream_error(make_error_code(errc::no_route), what + "its route (ADD_ROUTE) was refused or it already exited");
  return context(r.shared_from_this(), id, via.name() + "." + name->as<wire::str>().utf8);
}

}  // namespace mitogen::detail
