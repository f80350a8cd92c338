// Channels: receivers any context may be granted to send to, the queue Select waits
// on, and sending to a (context, handle). The Python classes (Receiver, Sender,
// Select, Latch, router.add_handler) are in mitogen_native/core.py and select.py;
// this file holds what must not run Python on the broker thread.
//
// Trust: a channel receiver without a respondent accepts messages only from the
// contexts its Sender was handed to by this program (as a call argument or inside
// a value sent through another Sender): to_wire() reports each Sender it converts
// (note_sender), and the call or send that carries it grants its destination
// (grant_scope::apply) before the message leaves. The check runs on the broker
// thread as the handler's policy. When the last granted context disconnects, the
// receiver gets a dead message, so nobody waits on a channel nobody can write to.
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

/// Who may send to one channel receiver's handle. Shared by the Python object and
/// (weakly) by the policy the broker thread runs.
struct channel_state {
  std::weak_ptr<mitogen::router> r;
  std::weak_ptr<mitogen::receiver> rx;
  std::uint32_t handle = 0;
  bool any = false;  ///< accept every context (a Python policy filters later)
  std::mutex mu;
  std::unordered_set<std::uint32_t> granted;                 // guarded by mu
  std::unordered_map<std::uint32_t, std::uint32_t> watchers;  // context -> watcher handle; guarded by mu

  bool allows(std::uint32_t src) {
    if (any) return true;
    std::lock_guard lk(mu);
    return granted.count(src) > 0;
  }

  /// Context `id` disconnected (broker thread, or the granting thread if it was gone
  /// already): once nobody granted is left, end the channel.
  void lost(std::uint32_t id, const std::string& why) {
    bool last;
    {
      std::lock_guard lk(mu);
      if (!granted.erase(id)) return;
      watchers.erase(id);
      last = granted.empty() && !any;
    }
    if (!last) return;
    if (auto q = rx.lock()) {
      auto m = wire::message::dead(0, handle, "the respondent context disconnected (" + why + ")");
      m.src_id = m.auth_id = id;
      q->push(std::move(m));
    }
  }

  ~channel_state() {
    auto router = r.lock();
    if (!router) return;
    for (auto& [id, h] : watchers) router->del_handler(h);
  }
};

std::mutex channels_mu;
/// (router, handle) -> the channel receiving there.
std::map<std::pair<const mitogen::router*, std::uint32_t>, std::weak_ptr<channel_state>> channels;

thread_local grant_scope* current_scope = nullptr;

void grant(const std::shared_ptr<mitogen::router>& r, std::uint32_t handle, std::uint32_t ctx) {
  if (ctx == r->context_id()) return;
  std::shared_ptr<channel_state> st;
  {
    std::lock_guard lk(channels_mu);
    auto it = channels.find({r.get(), handle});
    if (it != channels.end()) st = it->second.lock();
  }
  if (!st) return;  // not a channel receiver (a call's reply handle, or closed)
  {
    std::lock_guard lk(st->mu);
    if (!st->granted.insert(ctx).second) return;
  }
  // A handler nobody sends to, with `ctx` as its respondent: the router delivers a
  // dead message to it when ctx's stream closes.
  std::weak_ptr<channel_state> weak = st;
  auto h = r->add_handler(
      [weak, ctx](wire::message&& m) {
        if (!m.is_dead()) return;
        if (auto s = weak.lock()) s->lost(ctx, m.data);
      },
      {.handle = 0, .persist = true, .respondent = ctx});
  {
    std::lock_guard lk(st->mu);
    if (st->granted.count(ctx)) st->watchers[ctx] = h;
  }
  if (!r->stream_for(ctx)) st->lost(ctx, "context " + std::to_string(ctx) + " is not connected");
}

/// The Python-visible receiver of a channel.
struct py_channel {
  std::shared_ptr<mitogen::receiver> rx;
  std::shared_ptr<channel_state> st;
  std::shared_ptr<mitogen::router> r;
};

/// Register `st`; entries of receivers gone since are dropped now and then (their
/// weak_ptr expired), so the table stays as big as the live receivers.
void register_channel(const mitogen::router* r, const std::shared_ptr<channel_state>& st) {
  static std::size_t inserts = 0;
  std::lock_guard lk(channels_mu);
  if (++inserts % 256 == 0) {
    for (auto it = channels.begin(); it != channels.end();)
      it = it->second.expired() ? channels.erase(it) : std::next(it);
  }
  channels[{r, st->handle}] = st;
}

/// A queue of integer tokens: what Select waits on. Receivers (on the broker thread),
/// Python latches and inner selects put the token they were given when they have
/// something; Select.get() takes one and asks that member. C++ only, so the broker
/// thread can notify without Python.
struct select_queue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::uint64_t> q;
  bool closed = false;
  std::function<void()> notify;  ///< an outer select's; called without mu

  void put(std::uint64_t t) {
    std::function<void()> n;
    {
      std::lock_guard lk(mu);
      if (closed) return;
      q.push_back(t);
      n = notify;
    }
    cv.notify_one();
    if (n) n();
  }
  std::size_t size() {
    std::lock_guard lk(mu);
    return q.size();
  }
};

struct py_select_queue {
  std::shared_ptr<select_queue> q = std::make_shared<select_queue>();
};

std::function<void()> notifier(const std::shared_ptr<select_queue>& q, std::uint64_t token) {
  std::weak_ptr<select_queue> weak = q;
  return [weak, token] {
    if (auto s = weak.lock()) s->put(token);
  };
}

/// The core receiver behind a Python object Select accepts (channel or call_async).
std::shared_ptr<mitogen::receiver> receiver_of(py::handle o, std::size_t* already) {
  if (py::isinstance<py_channel>(o)) return o.cast<py_channel&>().rx;
  if (py::isinstance<py_receiver>(o)) {
    auto& pr = o.cast<py_receiver&>();
    if (pr.reply) ++*already;  // the result was taken from the queue already
    return pr.rx;
  }
  throw py::type_error("not a receiver");
}

py::tuple message_tuple(wire::message&& m) {
  return py::make_tuple(m.dst_id, m.src_id, m.auth_id, m.handle, m.reply_to,
                        py::bytes(m.data.data(), m.data.size()));
}

}  // namespace

grant_scope::grant_scope() : prev_(current_scope) { current_scope = this; }
grant_scope::~grant_scope() { current_scope = prev_; }

void grant_scope::apply(std::uint32_t dst_context) {
  for (auto& n : notes_) {
    if (n.target == n.r->context_id())
      grant(n.r, n.handle, dst_context);
    else if (n.target != dst_context)
      // Another context's handle: the receiving agent polices it; our router lets
      // dst_context reach it even when unidirectional, since we handed it over.
      n.r->allow_forward(dst_context, n.target, n.handle);
  }
  notes_.clear();
}

void note_sender(const mitogen::context& target, std::uint32_t handle) {
  if (!current_scope) return;
  current_scope->notes_.push_back({target.get_router(), target.id(), handle});
}

void register_channels(py::module_& m) {
  py::class_<py_channel>(m, "_ChannelReceiver", "Core of mitogen_native.core.Receiver.")
      .def(py::init([](py_router& pr, std::uint32_t handle, bool persist, std::optional<std::uint32_t> respondent,
                       bool any, bool overwrite) {
             auto st = std::make_shared<channel_state>();
             st->r = pr.r;
             st->any = any || respondent.has_value();  // a respondent is checked by the router
             mitogen::handler_options o;
             o.handle = handle;
             o.persist = persist;
             o.respondent = respondent;
             o.overwrite = overwrite;
             std::weak_ptr<channel_state> weak = st;
             o.policy = [weak](const wire::message& msg) {
               auto s = weak.lock();
               return s && s->allows(msg.src_id);
             };
             py_channel c;
             c.r = pr.r;
             {
               nogil g;
               c.rx = pr.r->make_receiver(std::move(o));
             }
             st->rx = c.rx;
             st->handle = c.rx->handle();
             register_channel(pr.r.get(), st);
             c.st = std::move(st);
             return c;
           }),
           py::arg("router"), py::arg("handle"), py::arg("persist"), py::arg("respondent"), py::arg("any"),
           py::arg("overwrite"))
      .def_property_readonly("handle", [](py_channel& c) { return c.rx->handle(); })
      .def(
          "get",
          [](py_channel& c, std::optional<double> timeout, bool block) -> py::object {
            if (!block) {
              auto m = c.rx->try_get();
              if (!m) throw mitogen::timeout_error("no message queued");
              return message_tuple(std::move(*m));
            }
            std::optional<wire::message> m;
            {
              // The common case of a stream: the next item is already queued.
              nogil g;
              m = c.rx->get_for(std::chrono::milliseconds(0));
            }
            if (!m) m = wait_message(*c.rx, timeout);
            return message_tuple(std::move(*m));
          },
          py::arg("timeout") = py::none(), py::arg("block") = true,
          "Next message as (dst_id, src_id, auth_id, handle, reply_to, data); TimeoutError.")
      .def("size", [](py_channel& c) { return c.rx->size(); })
      .def(
          "close",
          [](py_channel& c, const std::string& reason) {
            nogil g;
            c.rx->close(reason);
          },
          py::arg("reason"))
      .def(
          "grant",
          [](py_channel& c, std::uint32_t context_id) {
            nogil g;
            grant(c.r, c.rx->handle(), context_id);
          },
          py::arg("context_id"), "Let context `context_id` send to this receiver.")
      .def("granted", [](py_channel& c) {
        std::lock_guard lk(c.st->mu);
        return std::vector<std::uint32_t>(c.st->granted.begin(), c.st->granted.end());
      });

  py::class_<py_select_queue>(m, "_SelectQueue", "Core of mitogen_native.select.Select.")
      .def(py::init<>())
      .def("put", [](py_select_queue& s, std::uint64_t token) { s.q->put(token); })
      .def("size", [](py_select_queue& s) { return s.q->size(); })
      .def(
          "get",
          [](py_select_queue& s, std::optional<double> timeout, bool block) -> py::object {
            std::optional<std::uint64_t> tok;
            bool closed = false;
            auto take = [&](std::chrono::milliseconds slice) {
              std::unique_lock lk(s.q->mu);
              if (!s.q->cv.wait_for(lk, slice, [&] { return !s.q->q.empty() || s.q->closed; })) return false;
              if (s.q->closed) {
                closed = true;
              } else {
                tok = s.q->q.front();
                s.q->q.pop_front();
              }
              return true;
            };
            bool got;
            if (!block) {
              got = take(std::chrono::milliseconds(0));
            } else {
              got = wait_until(take, timeout);
            }
            if (closed) return py::none();
            if (!got) throw mitogen::timeout_error("nothing arrived within the timeout");
            return py::int_(*tok);
          },
          py::arg("timeout") = py::none(), py::arg("block") = true,
          "Next token; None once closed; TimeoutError.")
      .def("close",
           [](py_select_queue& s) {
             {
               std::lock_guard lk(s.q->mu);
               s.q->closed = true;
               s.q->q.clear();
               s.q->notify = nullptr;
             }
             s.q->cv.notify_all();
           })
      .def(
          "watch_receiver",
          [](py_select_queue& s, py::handle recv, std::uint64_t token) {
            std::size_t n = 0;
            auto rx = receiver_of(recv, &n);
            n += rx->set_notify(notifier(s.q, token));
            for (std::size_t i = 0; i < n; ++i) s.q->put(token);
          },
          "Put `token` once per message queued on `recv` now and later.")
      .def("unwatch_receiver",
           [](py_select_queue&, py::handle recv) {
             std::size_t n = 0;
             receiver_of(recv, &n)->set_notify(nullptr);
           })
      .def(
          "watch_queue",
          [](py_select_queue& s, py_select_queue& inner, std::uint64_t token) {
            std::size_t n;
            {
              std::lock_guard lk(inner.q->mu);
              inner.q->notify = notifier(s.q, token);
              n = inner.q->q.size();
            }
            for (std::size_t i = 0; i < n; ++i) s.q->put(token);
          },
          "Put `token` once per token in `inner` now and later (a nested Select).")
      .def("unwatch_queue", [](py_select_queue&, py_select_queue& inner) {
        std::lock_guard lk(inner.q->mu);
        inner.q->notify = nullptr;
      });

  m.def(
      "_send",
      [](const py_context& c, std::uint32_t handle, py::handle data) {
        wire::message msg;
        {
          grant_scope grants;
          wire::value v = to_wire(data, "data");
          grants.apply(c.ctx.id());
          nogil g;
          msg.data = wire::encode(v);
        }
        msg.dst_id = c.ctx.id();
        msg.handle = handle;
        nogil g;
        c.ctx.get_router()->route(std::move(msg));
      },
      py::arg("context"), py::arg("handle"), py::arg("data"), "Sender.send(): one message to (context, handle).");
  m.def(
      "_send_message",
      [](const py_context& c, std::uint32_t handle, std::uint32_t reply_to, py::handle value, py::object raw) {
        wire::message msg;
        if (!raw.is_none()) {
          // An already encoded payload (a received Message passed on): the receiving
          // agent decodes it with its restricted decoder, as anything we send.
          msg.data = raw.cast<std::string>();
        } else {
          grant_scope grants;
          wire::value v = to_wire(value, "data");
          grants.apply(c.ctx.id());
          nogil g;
          msg.data = wire::encode(v);
        }
        msg.dst_id = c.ctx.id();
        msg.handle = handle;
        msg.reply_to = reply_to;
        nogil g;
        c.ctx.get_router()->route(std::move(msg));
      },
      py::arg("context"), py::arg("handle"), py::arg("reply_to"), py::arg("value"), py::arg("raw"),
      "Context.send(): one message to (context, handle), its value encoded here or `raw` bytes as given.");
  m.def(
      "_send_dead",
      [](const py_context& c, std::uint32_t handle, const std::string& reason) {
        auto msg = wire::message::dead(c.ctx.id(), handle, reason);
        nogil g;
        c.ctx.get_router()->route(std::move(msg));
      },
      py::arg("context"), py::arg("handle"), py::arg("reason"), "Sender.close(): a dead message to (context, handle).");
  m.def(
      "_unpickle",
      [](py::object router, std::uint32_t src_id, py::bytes data) {
        auto& pr = router.cast<py_router&>();
        char* buf;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(data.ptr(), &buf, &len) != 0) throw py::error_already_set();
        std::span<const std::uint8_t> sv(reinterpret_cast<const std::uint8_t*>(buf), static_cast<std::size_t>(len));
        std::optional<wire::decode_result> r;
        if (sv.size() < 64 * 1024) {
          r = wire::decode(sv);
        } else {
          nogil g;  // `data` stays referenced by the caller
          r = wire::decode(sv);
        }
        if (!*r) {
          std::string why = "invalid message from context " + std::to_string(src_id) + ": " + r->ec.message() +
                            (r->detail.empty() ? "" : " (" + r->detail + ")");
          // Same rule as replies: a context that breaks the codec rules is cut off.
          if (src_id != pr.r->context_id()) pr.r->disconnect(src_id, make_error_code(mitogen::errc::protocol_error), why);
          throw mitogen::stream_error(make_error_code(mitogen::errc::protocol_error), why);
        }
        return from_wire(std::move(r->v), router);
      },
      py::arg("router"), py::arg("src_id"), py::arg("data"),
      "Decode a channel message with the restricted decoder (untrusted input).");
  m.def(
      "_del_handler", [](py_router& pr, std::uint32_t handle) { pr.r->del_handler(handle); }, py::arg("router"),
      py::arg("handle"));
}

}  // namespace mitogen::python
