#include "mitogen/io/stream.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

#include "mitogen/errors.hpp"

namespace mitogen {
namespace {

void set_nonblocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/// An epoll set holding `fd` with `events` (0: registered, reporting only errors
/// and hang-ups). The broker watches the set; the descriptor can leave it and come
/// back without the broker's knowledge (stream::lead()).
int epoll_set_of(int fd, std::uint32_t events) {
  int set = ::epoll_create1(EPOLL_CLOEXEC);
  if (set < 0) throw std::system_error(errno, std::generic_category(), "mitogen: epoll_create1");
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(set, EPOLL_CTL_ADD, fd, &ev) != 0) {
    int e = errno;
    ::close(set);
    throw std::system_error(e, std::generic_category(), "mitogen: epoll_ctl");
  }
  return set;
}

}  // namespace

std::shared_ptr<stream> stream::create(std::shared_ptr<broker> b, int read_fd, int write_fd,
                                       stream_options opts) {
  return std::shared_ptr<stream>(new stream(std::move(b), read_fd, write_fd, std::move(opts)));
}

stream::stream(std::shared_ptr<broker> b, int read_fd, int write_fd, stream_options opts)
    : broker_(std::move(b)),
      opts_(std::move(opts)),
      read_fd_(read_fd),
      write_fd_(write_fd),
      rd_(broker_->io()),
      parser_(opts_.max_message_size) {
  set_nonblocking(read_fd);
  set_nonblocking(write_fd);
  if (!opts_.leader_reads) {
    rd_.assign(read_fd);
    if (write_fd != read_fd) {
      wr_ = std::make_unique<boost::asio::posix::stream_descriptor>(broker_->io());
      wr_->assign(write_fd);
    }
    return;
  }
  // The broker watches epoll sets instead: read_fd_ can leave its set while a
  // caller leads. A shared socket gets a second set for write waits, armed only
  // while output is queued: Asio registers every descriptor for input, and the
  // socket's own input must not wake the broker.
  read_set_ = epoll_set_of(read_fd, EPOLLIN);
  rd_.assign(read_set_);
  wr_ = std::make_unique<boost::asio::posix::stream_descriptor>(broker_->io());
  if (write_fd == read_fd) {
    write_set_ = epoll_set_of(write_fd, 0);
    wr_->assign(write_set_);
  } else {
    wr_->assign(write_fd);
  }
}

stream::~stream() {
  // Descriptors close with their asio objects; nothing may be pending since every
  // handler holds a reference. With leader_reads the sets are asio's and read_fd_
  // (also write_fd_ if shared) is ours.
  if (read_set_ >= 0 && read_fd_open_) ::close(read_fd_);
}

void stream::start(raw_fn raw) {
  {
    std::lock_guard lk(rmu_);
    framed_ = !raw;
  }
  raw_ = std::move(raw);
  broker_->defer([self = shared_from_this()] { self->do_read(); });
}

bool stream::closed() const {
  std::lock_guard lk(wmu_);
  return closed_ || closing_;
}

std::size_t stream::queued_bytes() const {
  std::lock_guard lk(wmu_);
  return queued_;
}

namespace {

std::string header_of(const wire::message& m) {
  std::string h(wire::header_len, '\0');
  wire::encode_header(m, reinterpret_cast<std::uint8_t*>(h.data()));
  return h;
}

}  // namespace

bool stream::send(const wire::message& m) { return enqueue(header_of(m), m.data); }

bool stream::send(wire::message&& m) {
  auto h = header_of(m);
  return enqueue(std::move(h), std::move(m.data));
}

bool stream::send_raw(std::string bytes) { return enqueue({}, std::move(bytes)); }

bool stream::enqueue(std::string head, std::string body) {
  std::unique_lock lk(wmu_);
  if (closed_ || closing_) return false;
  std::size_t written = 0;
  if (queue_.empty()) {
    // Fast path: write inline from the caller's thread; no broker wake-up unless the
    // kernel buffer is full. Header and payload go out together, uncopied.
    iovec iov[2];
    int cnt = 0;
    if (!head.empty()) iov[cnt++] = {head.data(), head.size()};
    if (!body.empty()) iov[cnt++] = {body.data(), body.size()};
    ssize_t n;
    do {
      n = ::writev(write_fd_, iov, cnt);
    } while (n < 0 && errno == EINTR);
    if (n == static_cast<ssize_t>(head.size() + body.size())) return true;
    if (n < 0 && errno != EAGAIN) {
      write_error_ = std::error_code(errno, std::generic_category());
      lk.unlock();
      close(make_error_code(errc::child_died), std::string("write failed: ") + std::strerror(errno));
      return false;
    }
    written = n > 0 ? static_cast<std::size_t>(n) : 0;
  }
  // Queue what is left; head_off_ is the offset into the front entry, which is one
  // of ours only when the queue was empty.
  for (std::string* part : {&head, &body}) {
    if (part->empty()) continue;
    if (written >= part->size()) {
      written -= part->size();
      continue;
    }
    if (queue_.empty()) head_off_ = written;
    queued_ += part->size();
    queue_.push_back(std::move(*part));
    written = 0;
  }
  if (!write_armed_) {
    write_armed_ = true;
    broker_->defer([self = shared_from_this()] { self->arm_write(); });
  }
  if (queued_ > opts_.max_queued_bytes && !broker_->on_broker_thread()) {
    if (leader_thread_.load() == std::this_thread::get_id()) {
      // This thread leads (receiver::lead_first): while it waits here nobody would
      // read what the child sends, and a child blocked writing may never read our
      // output either. Step down (rmu_ comes before wmu_); lead() begins again.
      lk.unlock();
      step_down(std::this_thread::get_id(), /*park=*/false);
      lk.lock();
    }
    drained_.wait(lk, [&] { return closed_ || closing_ || queued_ <= opts_.max_queued_bytes / 2; });
    if (closed_ || closing_) return false;
  }
  return true;
}

bool stream::write_some_locked() {
  while (!queue_.empty()) {
    iovec iov[64];
    int cnt = 0;
    std::size_t off = head_off_;
    for (auto it = queue_.begin(); it != queue_.end() && cnt < 64; ++it, ++cnt) {
      iov[cnt].iov_base = it->data() + off;
      iov[cnt].iov_len = it->size() - off;
      off = 0;
    }
    ssize_t n = ::writev(write_fd_, iov, cnt);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return true;
      write_error_ = std::error_code(errno, std::generic_category());
      return false;
    }
    auto left = static_cast<std::size_t>(n);
    while (left > 0) {
      std::size_t avail = queue_.front().size() - head_off_;
      if (left >= avail) {
        left -= avail;
        queued_ -= queue_.front().size();
        queue_.pop_front();
        head_off_ = 0;
      } else {
        head_off_ += left;
        left = 0;
      }
    }
  }
  return true;
}

void stream::arm_write() {
  if (write_set_ >= 0) {
    // The set reports writability as input (it is an epoll descriptor). Armed only
    // while output is queued; nobody collects its events, so it is disarmed by hand
    // once it fired, or every write-space wake-up of the socket would wake us.
    set_write_interest(EPOLLOUT);
    wr_->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                    [self = shared_from_this()](const boost::system::error_code& ec) {
                      if (ec) return;  // operation_aborted: closing
                      self->set_write_interest(0);
                      self->flush_on_broker();
                    });
    return;
  }
  auto& d = wr_ ? *wr_ : rd_;
  d.async_wait(boost::asio::posix::stream_descriptor::wait_write,
               [self = shared_from_this()](const boost::system::error_code& ec) {
                 if (ec) return;  // operation_aborted: closing
                 self->flush_on_broker();
               });
}

void stream::set_write_interest(std::uint32_t events) {
  std::lock_guard lk(wmu_);
  if (closed_) return;  // the set is closed, its number maybe reused
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = write_fd_;
  ::epoll_ctl(write_set_, EPOLL_CTL_MOD, write_fd_, &ev);
}

void stream::flush_on_broker() {
  std::unique_lock lk(wmu_);
  if (closed_ || closing_) return;  // closing: queued output is discarded
  if (!write_some_locked()) {
    auto err = write_error_;
    lk.unlock();
    close_on_broker(make_error_code(errc::child_died), "write failed: " + err.message());
    return;
  }
  if (queued_ <= opts_.max_queued_bytes / 2) drained_.notify_all();
  if (queue_.empty()) {
    write_armed_ = false;
    return;
  }
  lk.unlock();
  arm_write();
}

namespace {

/// The read buffer of the calling thread (the broker's): streams read into it and
/// parse at once, so an idle stream holds no buffer of its own (a daemon with
/// thousands of idle contexts would otherwise pin 256 KiB each).
char* read_scratch(std::size_t size) {  // the broker's, and each leader's
  thread_local std::unique_ptr<char[]> buf;
  thread_local std::size_t have = 0;
  if (have < size) {
    buf.reset(new char[size]);
    have = size;
  }
  return buf.get();
}

}  // namespace

void stream::do_read() {
  if (closed()) return;
  rd_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                 [self = shared_from_this()](const boost::system::error_code& ec) {
                   if (ec == boost::asio::error::operation_aborted) return;
                   if (ec) {
                     self->close_on_broker(make_error_code(errc::child_died), ec.message());
                     return;
                   }
                   self->read_ready();
                 });
}

void stream::read_ready() {
  if (closed()) return;
  if (read_set_ >= 0) {
    std::lock_guard lk(rmu_);
    if (leader_) {
      // A caller leads and reads; only an error or hang-up can have woken us. Waiting
      // again now would spin on it until the caller steps down: the caller has us
      // wait again then.
      broker_woken_ = true;
      return;
    }
    // Parked, woken by an error or hang-up: read as usual from now on.
    if (read_fd_open_) mute_locked(false);
    reading_ = true;
  }
  char* buf = read_scratch(opts_.read_chunk);
  ssize_t n;
  do {
    n = ::read(read_fd_, buf, opts_.read_chunk);
  } while (n < 0 && errno == EINTR);
  const int err = n < 0 ? errno : 0;
  if (n > 0) handle_input(buf, static_cast<std::size_t>(n));
  if (read_set_ >= 0) {
    std::lock_guard lk(rmu_);
    reading_ = false;
  }
  if (n > 0 || err == EAGAIN) {
    do_read();
  } else if (n == 0) {
    close_on_broker(make_error_code(errc::child_died), "end of file");
  } else {
    close_on_broker(make_error_code(errc::child_died), std::strerror(err));
  }
}

void stream::handle_input(const char* data, std::size_t n) {
  if (!raw_) {
    parse_frames({reinterpret_cast<const std::uint8_t*>(data), n});
    return;
  }
  raw_pending_.append(data, n);
  bool framed = false;
  std::size_t used = raw_(raw_pending_, framed);
  if (closed()) return;
  raw_pending_.erase(0, used);
  if (!framed) return;
  raw_ = nullptr;
  {
    std::lock_guard lk(rmu_);
    framed_ = true;
  }
  // What followed the marker is already frames.
  std::string rest;
  rest.swap(raw_pending_);
  parse_frames({reinterpret_cast<const std::uint8_t*>(rest.data()), rest.size()});
}

void stream::parse_frames(std::span<const std::uint8_t> in) {
  while (!in.empty()) {
    wire::message m;
    auto st = parser_.parse(in, m);
    if (st == wire::frame_parser::status::bad) {
      close_on_broker(make_error_code(errc::protocol_error), "bad frame: " + parser_.error().message());
      return;
    }
    if (st == wire::frame_parser::status::need_more) break;
    if (on_message_) on_message_(std::move(m));
    if (closed()) return;
  }
}

// ------------------------------------------------------------ leader/follower

bool stream::begin_lead(int wake_fd) {
  if (read_set_ < 0 || broker_->on_broker_thread()) return false;
  std::lock_guard lk(rmu_);
  if (leader_ || reading_ || !framed_ || !read_fd_open_ || handed_over_.load() > 0 || closed()) return false;
  leader_ = true;
  leader_wake_fd_ = wake_fd;
  leader_thread_.store(std::this_thread::get_id());
  // From now on the broker is not woken by this stream's input (only by an error
  // or hang-up, which epoll always reports: read_ready() then leaves it to us).
  // Parked (muted since the last leader stepped down): nothing to do.
  mute_locked(true);
  return true;
}

stream::lead_status stream::lead(const take_fn& take, const std::function<bool()>& done,
                                 std::optional<std::chrono::steady_clock::time_point> deadline, int wake_fd,
                                 bool begun) {
  if (begun) {
    std::lock_guard lk(rmu_);
    begun = leader_ && leader_thread_.load() == std::this_thread::get_id();
  }
  if (!begun && !begin_lead(wake_fd)) return lead_status::busy;
  // A smaller buffer than the broker's: every thread that ever waits keeps one.
  const std::size_t chunk = std::min<std::size_t>(opts_.read_chunk, 64u * 1024u);
  char* buf = read_scratch(chunk);
  lead_status st = lead_status::busy;
  bool handing_over = false, bad = false;
  // A reply is rarely there yet: wait before the first read (one syscall less).
  bool wait_first = true;
  for (;;) {
    if (done()) {
      st = lead_status::done;
      break;
    }
    if (!wait_first) {
      ssize_t n = ::read(read_fd_, buf, chunk);
      if (n > 0) {
        std::span<const std::uint8_t> in{reinterpret_cast<const std::uint8_t*>(buf), static_cast<std::size_t>(n)};
        while (!in.empty()) {
          wire::message m;
          auto ps = parser_.parse(in, m);
          if (ps == wire::frame_parser::status::bad) {
            bad = true;
            break;
          }
          if (ps == wire::frame_parser::status::need_more) break;
          if (!handing_over && take(m)) continue;
          handing_over = true;
          hand_over(std::move(m));
        }
        if (bad || handing_over) break;  // wait for the broker as a follower
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n == 0 || errno != EAGAIN) break;  // the broker will find out and close
    }
    wait_first = false;
    int ms = -1;
    if (deadline) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        st = done() ? lead_status::done : lead_status::timed_out;
        break;
      }
      ms = static_cast<int>(std::min<long long>(left.count(), 1 << 30));
    }
    pollfd fds[2] = {{read_fd_, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    if (::poll(fds, wake_fd >= 0 ? 2 : 1, ms) > 0 && wake_fd >= 0 && (fds[1].revents & POLLIN)) {
      std::uint64_t count;
      (void)!::read(wake_fd, &count, sizeof count);
      std::lock_guard lk(rmu_);
      if (close_read_fd_) break;  // closed under us: the broker releases the waiters
    }
  }
  // Before stepping down: from then on the broker may be using the parser.
  if (bad) close(make_error_code(errc::protocol_error), "bad frame: " + parser_.error().message());
  // Frames handed over: this thread now waits for the broker to deliver.
  step_down(std::this_thread::get_id(), /*park=*/!handing_over);
  return st;
}

void stream::end_lead(std::thread::id owner) { step_down(owner, true); }

void stream::step_down(std::thread::id owner, bool park) {
  bool rearm = false;
  {
    // Step down: the broker watches again (and, if input is waiting, reads it), now
    // or, parked, once its park limit passes or a thread follows.
    std::lock_guard lk(rmu_);
    if (!leader_ || leader_thread_.load() != owner) return;  // stepped down already
    leader_ = false;
    leader_wake_fd_ = -1;
    leader_thread_.store(std::thread::id());
    rearm = std::exchange(broker_woken_, false);
    if (close_read_fd_) {
      close_read_fd_ = false;
      ::close(read_fd_);
    } else if (read_fd_open_) {
      // Park: stay muted, so that the next call (commonly right after this one)
      // needs no epoll_ctl() to lead, and this step-down none either. The broker
      // unmutes within its park limit. Listed first, then the followers counted: a
      // thread starting to follow counts itself first, then unparks what is listed.
      park = park && !rearm && broker_->parking();
      if (park && !park_listed_) {
        park_listed_ = true;
        // Aliased: parkable is a private base, which weak_ptr cannot convert to.
        broker_->park(std::shared_ptr<broker::parkable>(shared_from_this(), this));
      }
      if (!park || broker_->followed()) mute_locked(false);
    }
  }
  // The broker was woken while we led (a hang-up) and did not wait again, so as not
  // to spin on a descriptor only we read: it waits again now, and sees the hang-up.
  if (rearm) broker_->defer([self = shared_from_this()] { self->do_read(); });
}

void stream::mute_locked(bool muted) {
  if (muted_ == muted) return;
  muted_ = muted;
  // MOD, not DEL and ADD: no allocation. Unmuting with input waiting wakes the
  // broker, which reads it.
  epoll_event ev{};
  ev.events = muted ? 0u : std::uint32_t{EPOLLIN};
  ev.data.fd = read_fd_;
  ::epoll_ctl(read_set_, EPOLL_CTL_MOD, read_fd_, &ev);
}

bool stream::unpark() {
  std::lock_guard lk(rmu_);
  if (leader_ && read_fd_open_) return true;  // led again: ask later
  park_listed_ = false;
  if (read_fd_open_) mute_locked(false);
  return false;
}

void stream::hand_over(wire::message&& m) {
  handed_over_.fetch_add(1);
  auto self = shared_from_this();
  if (!broker_->defer([self, m = std::move(m)]() mutable {
        if (!self->closed() && self->on_message_) self->on_message_(std::move(m));
        self->handed_over_.fetch_sub(1);
      }))
    handed_over_.fetch_sub(1);  // the broker stopped: nobody is left to deliver to
}

void stream::close_read_fd_locked() {
  if (!read_fd_open_) return;
  read_fd_open_ = false;
  if (leader_) {
    // The leader may be in poll() on it: closing it now would let the number be
    // reused under it. Wake it; it closes the descriptor as it steps down.
    close_read_fd_ = true;
    if (leader_wake_fd_ >= 0) {
      std::uint64_t one = 1;
      (void)!::write(leader_wake_fd_, &one, sizeof one);
    }
    return;
  }
  ::close(read_fd_);
}

void stream::close(std::error_code reason, std::string detail) {
  if (broker_->on_broker_thread()) {
    close_on_broker(reason, std::move(detail));
    return;
  }
  {
    // Refuse writes at once: no caller writes after this returns, although the
    // descriptors close (and on_disconnect runs) later, on the broker thread.
    std::lock_guard lk(wmu_);
    if (closed_ || closing_) return;
    closing_ = true;
  }
  drained_.notify_all();  // senders blocked by backpressure give up now
  auto self = shared_from_this();
  if (!broker_->defer([self, reason, d = std::move(detail)]() mutable { self->close_on_broker(reason, std::move(d)); })) {
    // Broker already stopped: close synchronously (no handlers can run any more).
    self->close_on_broker(reason, "broker stopped");
  }
}

void stream::close_on_broker(std::error_code reason, std::string detail) {
  {
    std::lock_guard lk(wmu_);
    if (closed_) return;
    closed_ = true;
    queue_.clear();
    queued_ = 0;
    boost::system::error_code ignored;
    if (read_set_ < 0) {
      rd_.cancel(ignored);
      rd_.close(ignored);
    }
    if (wr_) {
      wr_->cancel(ignored);
      wr_->close(ignored);
    }
  }
  if (read_set_ >= 0) {
    // Under rmu_: a leader changes the set (watch_input_locked) under it too, so the
    // set's number is never closed, and reused, under it.
    std::lock_guard lk(rmu_);
    reading_ = false;
    boost::system::error_code ignored;
    rd_.cancel(ignored);
    rd_.close(ignored);
    close_read_fd_locked();  // clears read_fd_open_: the set is gone with it
  }
  drained_.notify_all();
  if (auto fn = std::move(on_disconnect_)) {
    on_disconnect_ = nullptr;
    fn(reason, detail);
  }
  on_message_ = nullptr;
  raw_ = nullptr;
}

}  // namespace mitogen
