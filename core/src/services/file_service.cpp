// File transfer (docs/files.md, wire format in docs/protocol.md "File transfer").
//
// A transfer is a source feeding a sink, one chunk at a time, on the caller's
// thread: local_source -> remote_sink (send_file), remote_source -> local_sink
// (fetch_file), remote_source -> remote_sink (copy_file). The remote ends run a
// function of the agent (_file_receive / _file_send) that streams raw chunks on a
// handle of its own; whoever receives acknowledges what it has written and the
// sender keeps at most `window * chunk_size` bytes unacknowledged, so memory is
// bounded on both sides. Messages from contexts arrive on the broker thread, where
// the handlers below check them (sizes, counts, flow control) before anything is
// kept; a context that breaks the rules is disconnected.
#include "mitogen/services/file_service.hpp"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <system_error>
#include <vector>

#include "mitogen/wire/constants.hpp"

namespace mitogen {
namespace {

using clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::string strerror_text(int e) { return std::system_category().message(e); }

[[noreturn]] void throw_errno(const std::string& what, int e) { throw file_error(what + ": " + strerror_text(e), e); }

std::string be64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 7; i >= 0; --i, v >>= 8) s[static_cast<std::size_t>(i)] = static_cast<char>(v & 0xff);
  return s;
}

std::uint64_t read_be(const std::string& s, std::size_t off, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v = (v << 8) | static_cast<unsigned char>(s[off + i]);
  return v;
}

/// "[Errno 28] ..." in a remote OSError's message -> 28; 0 if absent.
int remote_errno(const std::string& msg) {
  auto p = msg.find("[Errno ");
  if (p == std::string::npos) return 0;
  int v = 0;
  for (p += 7; p < msg.size() && v < 100000 && msg[p] >= '0' && msg[p] <= '9'; ++p) v = v * 10 + (msg[p] - '0');
  return v;
}

/// A uid or gid from a name or a decimal number; -1 if not given.
long local_id(const std::optional<std::string>& v, bool user) {
  if (!v) return -1;
  if (!v->empty() && v->find_first_not_of("0123456789") == std::string::npos && v->size() < 10)
    return std::stol(*v);
  std::vector<char> buf(16384);
  if (user) {
    passwd pw{}, *res = nullptr;
    if (getpwnam_r(v->c_str(), &pw, buf.data(), buf.size(), &res) == 0 && res) return static_cast<long>(pw.pw_uid);
  } else {
    group gr{}, *res = nullptr;
    if (getgrnam_r(v->c_str(), &gr, buf.data(), buf.size(), &res) == 0 && res) return static_cast<long>(gr.gr_gid);
  }
  throw file_error(std::string("unknown ") + (user ? "user " : "group ") + *v, EINVAL);
}

/// An owner/group option as the agent takes it: int if numeric, else the name.
wire::value id_value(const std::optional<std::string>& v) {
  if (!v) return wire::none{};
  if (!v->empty() && v->find_first_not_of("0123456789") == std::string::npos && v->size() < 10)
    return wire::value(std::int64_t{std::stol(*v)});
  return wire::str{*v};
}

void check_options(const file_options& o) {
  if (o.chunk_size == 0 || o.chunk_size > (64u << 20)) throw file_error("chunk_size must be 1 byte to 64 MiB", EINVAL);
  if (o.window == 0 || o.window > 1024) throw file_error("window must be 1 to 1024 chunks", EINVAL);
  if (o.mode && *o.mode > 07777) throw file_error("mode must be at most 07777", EINVAL);
}

// ---- local files

class local_source {
 public:
  explicit local_source(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw_errno("opening " + path, errno);
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw_errno("stat " + path, errno);
    if (!S_ISREG(st.st_mode)) throw file_error(path + ": not a regular file", EINVAL);
    size_ = static_cast<std::uint64_t>(st.st_size);
    mode_ = st.st_mode & 07777;
    ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
  }
  ~local_source() {
    if (fd_ >= 0) ::close(fd_);
  }
  local_source(const local_source&) = delete;
  local_source& operator=(const local_source&) = delete;
  std::uint64_t size() const { return size_; }
  std::uint32_t mode() const { return mode_; }
  /// Exactly `n` bytes at `off`, read straight into the future message payload.
  std::string read(std::uint64_t off, std::size_t n) {
    std::string buf;
    buf.resize(n);
    std::size_t got = 0;
    while (got < n) {
      ssize_t r = ::pread(fd_, buf.data() + got, n - got, static_cast<off_t>(off + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw_errno("reading " + path_, errno);
      if (r == 0) throw file_error(path_ + ": file shrank while being sent", EIO);
      got += static_cast<std::size_t>(r);
    }
    return buf;
  }

 private:
  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::uint32_t mode_ = 0;
};

/// Writes to `.<name>.<random>.tmp` next to the destination; commit() renames it
/// into place, destruction without commit() removes it.
class local_sink {
 public:
  explicit local_sink(const std::string& path) : path_(path) {
    auto slash = path.rfind('/');
    dir_ = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    if (name.empty()) throw file_error(path + ": Is a directory", EISDIR);
    std::string tmpl = (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) + "." +
                       name.substr(0, 200) + ".XXXXXX.tmp";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    fd_ = ::mkostemps(buf.data(), 4, O_CLOEXEC);  // O_EXCL, mode 0600
    if (fd_ < 0) throw_errno("creating a temporary file for " + path, errno);
    tmp_.assign(buf.data());
  }
  ~local_sink() {
    if (fd_ >= 0) ::close(fd_);
    if (!tmp_.empty()) ::unlink(tmp_.c_str());
  }
  local_sink(const local_sink&) = delete;
  local_sink& operator=(const local_sink&) = delete;
  void write(const std::string& data) {
    const char* p = data.data();
    std::size_t left = data.size();
    while (left) {
      ssize_t r = ::write(fd_, p, left);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw_errno("writing " + path_, errno);
      p += r;
      left -= static_cast<std::size_t>(r);
    }
  }
  void commit(std::uint32_t mode, long uid, long gid) {
    if (::fsync(fd_) != 0) throw_errno("writing " + path_, errno);
    if ((uid != -1 || gid != -1) && ::fchown(fd_, static_cast<uid_t>(uid), static_cast<gid_t>(gid)) != 0)
      throw_errno("changing the owner of " + path_, errno);
    if (::fchmod(fd_, static_cast<mode_t>(mode)) != 0) throw_errno("changing the mode of " + path_, errno);
    int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw_errno("writing " + path_, errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) throw_errno("renaming into " + path_, errno);
    tmp_.clear();
    int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);  // best effort: the file itself is already durable
      ::close(dfd);
    }
  }

 private:
  std::string path_, dir_, tmp_;
  int fd_ = -1;
};

// ---- remote ends

/// What the broker thread's handlers share with the caller's thread.
struct remote_state {
  std::mutex mu;
  std::condition_variable cv;
  std::optional<wire::message> reply;  ///< the agent function's reply
  std::string failure;                 ///< set when the peer went away or broke the rules
  int failure_errno = 0;               ///< EPIPE (went away) or EPROTO (broke the rules)
  clock::time_point progress = clock::now();

  // remote_sink: bytes handed to the stream / acknowledged; the agent's data handle.
  std::uint64_t sent = 0, acked = 0;
  std::uint32_t peer_handle = 0;  // sink: data handle; source: ack handle
  // remote_source: the announced size and mode, chunks waiting for the caller.
  bool have_header = false;
  std::uint64_t size = 0, received = 0, ack_sent = 0;
  std::uint32_t mode = 0;
  std::deque<std::string> chunks;
};

/// Common part of both remote ends: the handlers' registration and the waits.
class remote_end {
 public:
  remote_end(const context& ctx, const file_options& o)
      : ctx_(ctx), r_(ctx.get_router()), opts_(o), st_(std::make_shared<remote_state>()),
        window_bytes_(static_cast<std::uint64_t>(o.chunk_size) * o.window),
        ack_bytes_(std::max<std::uint64_t>(1, window_bytes_ / 2)) {
    auto st = st_;
    handler_options ho;
    ho.persist = false;
    ho.respondent = ctx.id();
    reply_handle_ = r_->add_handler(
        [st](wire::message&& m) {
          std::lock_guard lk(st->mu);
          st->reply = std::move(m);
          st->progress = clock::now();
          st->cv.notify_all();
        },
        ho);
  }
  ~remote_end() { r_->del_handler(reply_handle_); }
  remote_end(const remote_end&) = delete;
  remote_end& operator=(const remote_end&) = delete;

 protected:
  /// Call mitogen.core.<fn>(args) in the context; its reply goes to reply_handle_.
  void start_call(const char* fn, wire::tuple args) {
    call_spec spec;
    spec.module = "mitogen.core";
    spec.function = fn;
    spec.args = std::move(args);
    auto m = ctx_.make_call(std::move(spec));
    m.reply_to = reply_handle_;
    r_->route(std::move(m));
  }

  /// Wait (lock held) until `done()`, failing on cancel or, once the transfer
  /// started (`started`), on no progress. Until the agent function runs, the
  /// call may be queued behind others in the context, like any call: no limit.
  template <class Pred>
  void wait(std::unique_lock<std::mutex>& lk, Pred done, const char* doing, bool started = true) {
    if (done()) return;
    // What we wait for is read and handled by the broker: no stream may stay parked.
    broker::follower following(r_->get_broker());
    while (!done()) {
      if (opts_.cancel && opts_.cancel->load()) throw file_error("transfer cancelled", ECANCELED);
      if (started && clock::now() - st_->progress > opts_.idle_timeout)
        throw file_error("context " + ctx_.name() + " made no progress for " +
                             std::to_string(opts_.idle_timeout.count() / 1000.0).substr(0, 6) + " s while " + doing,
                         ETIMEDOUT);
      st_->cv.wait_for(lk, 50ms);
    }
  }

  /// The agent function's reply as a byte count; throws its error.
  std::uint64_t reply_count() {
    wire::value v;
    try {
      v = ctx_.result(*st_->reply);
    } catch (const call_error& e) {
      throw file_error("context " + ctx_.name() + ": " + e.type_name() + ": " + e.remote_message(),
                       remote_errno(e.remote_message()));
    } catch (const channel_error& e) {
      throw file_error("context " + ctx_.name() + ": " + e.what(), EPIPE);
    } catch (const error& e) {
      throw file_error("context " + ctx_.name() + ": " + e.what(), EPROTO);
    }
    if (!v.is<std::int64_t>() || v.as<std::int64_t>() < 0)
      throw file_error("context " + ctx_.name() + " answered the transfer with " + wire::describe(v), EPROTO);
    return static_cast<std::uint64_t>(v.as<std::int64_t>());
  }

  /// The peer broke the protocol: fail (lock held), forget what it sent, disconnect it.
  static void violation(remote_state& st, const std::shared_ptr<router>& r, const context& ctx,
                        const std::string& what) {
    if (!st.failure.empty()) return;
    st.failure = "context " + ctx.name() + " " + what;
    st.failure_errno = EPROTO;
    st.chunks.clear();
    st.chunks.shrink_to_fit();
    st.cv.notify_all();
    // Not from the broker thread's handler itself: disconnect() may run inline.
    r->get_broker()->defer([r, id = ctx.id(), why = st.failure] { r->disconnect(id, errc::protocol_error, why); });
  }

  [[noreturn]] void throw_failure() {
    throw file_error(st_->failure, st_->failure_errno);
  }

  /// Tell the agent function to stop (a dead message to its handle). Also sent
  /// after it failed: a failed _file_receive swallows chunks still in flight
  /// until this arrives. A dead message nobody waits for is dropped quietly.
  void stop_peer(const std::string& reason) {
    std::uint32_t h;
    {
      std::lock_guard lk(st_->mu);
      if (!st_->peer_handle) return;
      h = st_->peer_handle;
    }
    r_->route(wire::message::dead(ctx_.id(), h, reason));
  }

  context ctx_;
  std::shared_ptr<router> r_;
  file_options opts_;
  std::shared_ptr<remote_state> st_;
  std::uint64_t window_bytes_, ack_bytes_;
  std::uint32_t reply_handle_ = 0;
};

/// The agent's _file_receive(): we send chunks, it acknowledges.
class remote_sink : public remote_end {
 public:
  remote_sink(const context& ctx, const file_options& o) : remote_end(ctx, o) {
    auto st = st_;
    auto r = r_;
    auto c = ctx_;
    handler_options ho;
    ho.respondent = ctx.id();
    ack_handle_ = r_->add_handler(
        [st, r, c](wire::message&& m) {
          std::lock_guard lk(st->mu);
          st->progress = clock::now();
          st->cv.notify_all();
          if (m.is_dead()) {
            if (st->failure.empty()) {
              st->failure = "context " + c.name() + " disconnected: " + m.data;
              st->failure_errno = EPIPE;
            }
            return;
          }
          if (!st->failure.empty()) return;
          if (m.data.size() != 8)
            return violation(*st, r, c, "sent a malformed acknowledgement (" + std::to_string(m.data.size()) + " bytes)");
          auto v = read_be(m.data, 0, 8);
          if (!st->peer_handle) {
            if (v != 0 || m.reply_to < wire::first_dynamic_handle || m.reply_to == wire::IS_DEAD)
              return violation(*st, r, c, "sent a malformed start of transfer");
            st->peer_handle = m.reply_to;
          } else if (v < st->acked || v > st->sent) {
            return violation(*st, r, c, "acknowledged " + std::to_string(v) + " bytes of " + std::to_string(st->sent) + " sent");
          } else {
            st->acked = v;
          }
        },
        ho);
  }
  ~remote_sink() {
    if (!succeeded_) stop_peer("transfer aborted by the sender");
    r_->del_handler(ack_handle_);
  }

  void start(const std::string& path, std::uint64_t size, std::uint32_t mode) {
    size_ = size;
    wire::tuple args;
    args.items = {wire::str{path}, wire::value(static_cast<std::int64_t>(size)),
                  wire::value(static_cast<std::int64_t>(mode)), id_value(opts_.owner), id_value(opts_.group),
                  wire::sender_ref{r_->context_id(), ack_handle_},
                  wire::value(static_cast<std::int64_t>(ack_bytes_))};
    start_call("_file_receive", std::move(args));
    std::unique_lock lk(st_->mu);
    wait(lk, [&] { return st_->peer_handle || st_->reply || !st_->failure.empty(); }, "starting to receive",
         false);
    // An empty file is complete once started: the agent's reply may already be here
    // (then finish() reads it); only with bytes still to send is a reply early.
    if (st_->reply && !(st_->peer_handle && size_ == 0)) early_reply(lk);
    if (!st_->failure.empty()) throw_failure();
  }

  void write(std::string&& chunk) {
    const auto n = chunk.size();
    std::uint32_t h;
    {
      std::unique_lock lk(st_->mu);
      wait(lk, [&] { return st_->reply || !st_->failure.empty() || st_->sent + n - st_->acked <= window_bytes_; },
           "receiving");
      if (st_->reply) early_reply(lk);
      if (!st_->failure.empty()) throw_failure();
      st_->sent += n;  // before routing: its acknowledgement may come back at once
      h = st_->peer_handle;
    }
    wire::message m;
    m.dst_id = ctx_.id();
    m.handle = h;
    m.data = std::move(chunk);
    r_->route(std::move(m));
  }

  std::uint64_t finish() {
    std::unique_lock lk(st_->mu);
    wait(lk, [&] { return st_->reply || !st_->failure.empty(); }, "finishing");
    if (!st_->reply) throw_failure();
    lk.unlock();
    auto n = reply_count();
    if (n != size_)
      throw file_error("context " + ctx_.name() + " wrote " + std::to_string(n) + " of " + std::to_string(size_) +
                           " bytes", EIO);
    succeeded_ = true;
    return n;
  }

 private:
  /// The agent function returned before it had everything: it failed, or lies.
  [[noreturn]] void early_reply(std::unique_lock<std::mutex>& lk) {
    lk.unlock();
    reply_count();  // throws the remote error, if any
    throw file_error("context " + ctx_.name() + " ended the transfer before receiving everything", EPROTO);
  }

  std::uint32_t ack_handle_ = 0;
  std::uint64_t size_ = 0;
  bool succeeded_ = false;
};

/// The agent's _file_send(): it sends a header then chunks, we acknowledge.
class remote_source : public remote_end {
 public:
  remote_source(const context& ctx, const file_options& o) : remote_end(ctx, o) {
    auto st = st_;
    auto r = r_;
    auto c = ctx_;
    const std::uint64_t chunk_limit = o.chunk_size, window = window_bytes_;
    handler_options ho;
    ho.respondent = ctx.id();
    data_handle_ = r_->add_handler(
        [st, r, c, chunk_limit, window](wire::message&& m) {
          std::lock_guard lk(st->mu);
          st->progress = clock::now();
          st->cv.notify_all();
          if (m.is_dead()) {
            if (st->failure.empty()) {
              st->failure = "context " + c.name() + " disconnected: " + m.data;
              st->failure_errno = EPIPE;
            }
            return;
          }
          if (!st->failure.empty()) return;  // dropped: the transfer already failed
          if (!st->have_header) {
            if (m.data.size() != 12 || m.reply_to < wire::first_dynamic_handle || m.reply_to == wire::IS_DEAD)
              return violation(*st, r, c, "sent a malformed file header");
            st->size = read_be(m.data, 0, 8);
            st->mode = static_cast<std::uint32_t>(read_be(m.data, 8, 4));
            if (st->mode > 07777 || st->size > (std::uint64_t{1} << 62))
              return violation(*st, r, c, "sent a malformed file header");
            st->peer_handle = m.reply_to;
            st->have_header = true;
            return;
          }
          const auto n = m.data.size();
          if (n == 0 || n > chunk_limit)
            return violation(*st, r, c, "sent a chunk of " + std::to_string(n) + " bytes (limit " +
                                            std::to_string(chunk_limit) + ")");
          if (st->received + n > st->size)
            return violation(*st, r, c, "sent more than the " + std::to_string(st->size) + " bytes it announced");
          if (st->received + n - st->ack_sent > window)
            return violation(*st, r, c, "ignored flow control (" + std::to_string(st->received + n - st->ack_sent) +
                                            " bytes unacknowledged, window " + std::to_string(window) + ")");
          st->received += n;
          st->chunks.push_back(std::move(m.data));
        },
        ho);
  }
  ~remote_source() {
    if (!succeeded_) stop_peer("transfer aborted by the receiver");
    r_->del_handler(data_handle_);
  }

  /// Ask for `path`; returns once its size and mode are known.
  void start(const std::string& path) {
    wire::tuple args;
    args.items = {wire::str{path}, wire::sender_ref{r_->context_id(), data_handle_},
                  wire::value(static_cast<std::int64_t>(opts_.chunk_size)),
                  wire::value(static_cast<std::int64_t>(window_bytes_))};
    start_call("_file_send", std::move(args));
    std::unique_lock lk(st_->mu);
    wait(lk, [&] { return st_->have_header || st_->reply || !st_->failure.empty(); }, "opening the file", false);
    if (!st_->failure.empty()) throw_failure();
    if (!st_->have_header) {
        lk.unlock();
      reply_count();
      throw file_error("context " + ctx_.name() + " ended the transfer before sending anything", EPROTO);
    }
  }
  std::uint64_t size() {
    std::lock_guard lk(st_->mu);
    return st_->size;
  }
  std::uint32_t mode() {
    std::lock_guard lk(st_->mu);
    return st_->mode;
  }

  /// The next chunk, or nullopt once the whole file arrived and the agent confirmed.
  std::optional<std::string> next() {
    std::unique_lock lk(st_->mu);
    wait(lk, [&] { return !st_->chunks.empty() || st_->reply || !st_->failure.empty(); }, "sending");
    if (!st_->failure.empty()) throw_failure();
    if (!st_->chunks.empty()) {
      auto c = std::move(st_->chunks.front());
      st_->chunks.pop_front();
      return c;
    }
    const auto received = st_->received, size = st_->size;
    lk.unlock();
    auto n = reply_count();
    if (received != size || n != size)
      throw file_error("context " + ctx_.name() + " ended the transfer after " + std::to_string(received) + " of " +
                           std::to_string(size) + " bytes",
                       EPROTO);
    succeeded_ = true;
    return std::nullopt;
  }

  /// `n` more bytes are safely written: acknowledge them when a window half is due.
  void consumed(std::size_t n) {
    consumed_ += n;
    std::uint32_t h;
    {
      std::lock_guard lk(st_->mu);
      // The last byte is always acknowledged: the agent waits for that before it returns.
      if (consumed_ - st_->ack_sent < ack_bytes_ && consumed_ < st_->size) return;
      st_->ack_sent = consumed_;  // before routing, so the handler's window check is never too strict
      h = st_->peer_handle;
    }
    wire::message m;
    m.dst_id = ctx_.id();
    m.handle = h;
    m.data = be64(consumed_);
    r_->route(std::move(m));
  }

 private:
  std::uint32_t data_handle_ = 0;
  std::uint64_t consumed_ = 0;
  bool succeeded_ = false;
};

}  // namespace

std::uint64_t send_file(const context& ctx, const std::string& local_path, const std::string& remote_path,
                        const file_options& opts) {
  check_options(opts);
  local_source src(local_path);
  remote_sink sink(ctx, opts);
  const auto size = src.size();
  sink.start(remote_path, size, opts.mode.value_or(src.mode()));
  for (std::uint64_t off = 0; off < size;) {
    auto chunk = src.read(off, static_cast<std::size_t>(std::min<std::uint64_t>(opts.chunk_size, size - off)));
    off += chunk.size();
    sink.write(std::move(chunk));
  }
  return sink.finish();
}

std::uint64_t fetch_file(const context& ctx, const std::string& remote_path, const std::string& local_path,
                         const file_options& opts) {
  check_options(opts);
  const long uid = local_id(opts.owner, true), gid = local_id(opts.group, false);
  local_sink sink(local_path);  // first: a local failure costs no round trip
  remote_source src(ctx, opts);
  src.start(remote_path);
  std::uint64_t n = 0;
  while (auto chunk = src.next()) {
    sink.write(*chunk);
    n += chunk->size();
    src.consumed(chunk->size());
  }
  sink.commit(opts.mode.value_or(src.mode()), uid, gid);
  return n;
}

std::uint64_t copy_file(const context& src_ctx, const std::string& src_path, const context& dst_ctx,
                        const std::string& dst_path, const file_options& opts) {
  check_options(opts);
  // Both agent functions run on the context's one main thread: the second would
  // wait behind the first forever.
  if (src_ctx.id() == dst_ctx.id() && src_ctx.get_router() == dst_ctx.get_router())
    throw file_error("copy_file within one context (" + src_ctx.name() + ") is not supported: call shutil.copyfile there",
                     EINVAL);
  remote_source src(src_ctx, opts);
  src.start(src_path);
  remote_sink sink(dst_ctx, opts);
  sink.start(dst_path, src.size(), opts.mode.value_or(src.mode()));
  while (auto chunk = src.next()) {
    const auto n = chunk->size();
    sink.write(std::move(*chunk));  // blocks while the destination's window is full
    src.consumed(n);
  }
  return sink.finish();
}

}  // namespace mitogen
