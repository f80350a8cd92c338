#include "mitogen/io/stream.hpp"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

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
  rd_.assign(read_fd);
  if (write_fd != read_fd) {
    wr_ = std::make_unique<boost::asio::posix::stream_descriptor>(broker_->io());
    wr_->assign(write_fd);
  }
}

stream::~stream() {
  // Descriptors close with their asio objects; nothing may be pending since every
  // handler holds a reference.
}

void stream::start(raw_fn raw) {
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
  auto& d = wr_ ? *wr_ : rd_;
  d.async_wait(boost::asio::posix::stream_descriptor::wait_write,
               [self = shared_from_this()](const boost::system::error_code& ec) {
                 if (ec) return;  // operation_aborted: closing
                 self->flush_on_broker();
               });
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
char* read_scratch(std::size_t size) {
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
  char* buf = read_scratch(opts_.read_chunk);
  ssize_t n;
  do {
    n = ::read(read_fd_, buf, opts_.read_chunk);
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    handle_input(buf, static_cast<std::size_t>(n));
    do_read();
  } else if (n == 0) {
    close_on_broker(make_error_code(errc::child_died), "end of file");
  } else if (errno == EAGAIN) {
    do_read();
  } else {
    close_on_broker(make_error_code(errc::child_died), std::strerror(errno));
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
    rd_.cancel(ignored);
    rd_.close(ignored);
    if (wr_) {
      wr_->cancel(ignored);
      wr_->close(ignored);
    }
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
