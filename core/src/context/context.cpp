#include "mitogen/context/context.hpp"

#include "mitogen/errors.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen {

wire::value reply_value(const wire::message& m) {
  if (m.is_dead())
    throw channel_error(m.data.empty() ? std::string("Channel closed by remote end.") : m.data);
  auto r = wire::decode(m.data);
  if (!r)
    throw stream_error(make_error_code(errc::protocol_error),
                       "invalid reply from context " + std::to_string(m.src_id) + ": " + r.ec.message() +
                           (r.detail.empty() ? "" : " (" + r.detail + ")"));
  if (r.v.is<wire::call_error>()) throw call_error(r.v.as<wire::call_error>().message);
  return std::move(r.v);
}

wire::message context::make_call(call_spec spec) const {
  wire::tuple t;
  t.items.reserve(6);
  t.items.emplace_back(wire::none{});  // chain_id
  t.items.emplace_back(wire::str{std::move(spec.module)});
  if (spec.class_name)
    t.items.emplace_back(wire::str{std::move(*spec.class_name)});
  else
    t.items.emplace_back(wire::none{});
  t.items.emplace_back(wire::str{std::move(spec.function)});
  t.items.emplace_back(std::move(spec.args));
  // An empty Kwargs costs the agent a global lookup and a REDUCE on every call
  // (~0.5 us of Python); an empty dict means the same to every agent, ours and
  // upstream's.
  if (spec.kwargs.items.empty())
    t.items.emplace_back(wire::dict{});
  else
    t.items.emplace_back(std::move(spec.kwargs));
  wire::message m;
  m.dst_id = id_;
  m.handle = wire::CALL_FUNCTION;
  m.data = wire::encode(wire::value(std::move(t)));
  return m;
}

std::shared_ptr<receiver> context::send_async(wire::message m, bool wait_here) const {
  auto rx = router_->make_receiver(id_, /*persist=*/false);
  m.dst_id = id_;
  m.reply_to = rx->handle();
  if (wait_here) rx->lead_first();
  router_->route(std::move(m));
  return rx;
}

std::shared_ptr<receiver> context::call_async(call_spec spec, bool wait_here) const {
  return send_async(make_call(std::move(spec)), wait_here);
}

wire::value context::result(const wire::message& m) const {
  try {
    return reply_value(m);
  } catch (const stream_error& e) {
    // A context that breaks the codec rules cannot be trusted with more traffic.
    router_->disconnect(id_, e.code(), e.what());
    throw;
  }
}

wire::value context::call(call_spec spec, std::optional<std::chrono::steady_clock::duration> timeout) const {
  auto rx = call_async(std::move(spec), /*wait_here=*/true);
  return result(rx->get(timeout));
}

void context::call_no_reply(call_spec spec) const { router_->route(make_call(std::move(spec))); }

bool context::shutdown(bool wait, std::chrono::milliseconds timeout) const {
  wire::message m;
  m.dst_id = id_;
  m.handle = wire::SHUTDOWN;
  router_->route(std::move(m));
  if (!wait) return true;
  return router_->wait_disconnected(id_, timeout);
}

}  // namespace mitogen
