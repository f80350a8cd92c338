#pragma once
/// Stream: messages framed over a pair of file descriptors (pipes, a UNIX socket,
/// a PTY). Reads run on the broker thread; sends may come from any thread.
#include <utility>  // before Asio (Boost 1.74 + C++20)

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <boost/asio/posix/stream_descriptor.hpp>

#include "mitogen/io/broker.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/message.hpp"

namespace mitogen {

/// Sizes and names for a stream.
struct stream_options {
  std::string name = "stream";                                      ///< for logs
  std::uint32_t max_message_size = wire::default_max_message_size;  ///< inbound frame limit
  /// Bytes queued for writing above which senders on other threads block until the
  /// queue drains to half (backpressure). The broker thread never blocks.
  std::size_t max_queued_bytes = 16u * 1024u * 1024u;
  /// Bytes per read() call, into a buffer of the broker thread's (an idle stream
  /// holds none).
  std::size_t read_chunk = 256u * 1024u;
  /// Let a thread waiting for a reply read this stream itself (lead()), so that the
  /// reply wakes that thread alone, not the broker and then the thread. Costs a
  /// descriptor (an epoll set the broker watches instead of read_fd; a second one
  /// when read_fd == write_fd). Off for streams nobody waits on (the multiplexer's
  /// clients).
  bool leader_reads = false;
};

/// Owned by shared_ptr (handlers capture it). Closing is idempotent; after close,
/// send() returns false and nothing is read.
class stream : public std::enable_shared_from_this<stream>, private broker::parkable {
 public:
  /// Called on the broker thread for every whole inbound frame.
  using message_fn = std::function<void(wire::message&&)>;
  /// Called once on the broker thread when the stream closes, with the reason.
  using disconnect_fn = std::function<void(std::error_code, const std::string&)>;
  /// Raw phase (bootstrap): gets the inbound bytes not yet consumed; returns how many
  /// it consumed; sets `framed` to switch the rest of the input to frame parsing.
  using raw_fn = std::function<std::size_t(std::string_view, bool& framed)>;

  /// Takes ownership of the descriptors (they may be equal, e.g. a socketpair). Both
  /// are made non-blocking.
  static std::shared_ptr<stream> create(std::shared_ptr<broker> b, int read_fd, int write_fd,
                                        stream_options opts);
  ~stream();

  /// Set callbacks before start(). Not thread-safe against start().
  void on_message(message_fn fn) { on_message_ = std::move(fn); }
  void on_disconnect(disconnect_fn fn) { on_disconnect_ = std::move(fn); }
  /// The message callback set now, so that a filter can wrap it (the multiplexer
  /// drops a client whose frames name another source). Same rules as on_message().
  const message_fn& message_handler() const noexcept { return on_message_; }

  /// Begin reading (posted to the broker thread). With `raw`, input goes to it until it
  /// switches to framing.
  void start(raw_fn raw = {});

  /// Queue one framed message. Any thread. Writes inline when nothing is queued (the
  /// common case costs one write() and no broker wake-up). Returns false if closed.
  /// Blocks (off the broker thread) while the queue is over max_queued_bytes.
  bool send(const wire::message& m);
  /// As above, taking the payload without copying it.
  bool send(wire::message&& m);
  /// Queue raw bytes (bootstrap preamble). Same rules as send().
  bool send_raw(std::string bytes);

  /// Close both directions now, discarding queued output. Any thread; idempotent; the
  /// first reason wins. Once it returns, send() returns false and nothing more is
  /// written, even from another thread; off the broker thread the descriptors close,
  /// and on_disconnect runs, a little later on the broker thread.
  void close(std::error_code reason, std::string detail);

  /// What lead() did.
  enum class lead_status {
    done,       ///< `done()` became true
    busy,       ///< could not lead, or handed frames to the broker: wait as usual
    timed_out,  ///< the deadline passed first
  };
  /// Offered every whole frame a leader reads, in order: true if it consumed the
  /// frame; false to hand it to the broker like any other (and, to keep their order,
  /// every later frame of this turn too).
  using take_fn = std::function<bool(wire::message&)>;
  /// Leader/follower reading (docs/architecture.md, "A caller reads its reply"): on
  /// the calling thread, read frames until `done()` is true, offering each to `take`,
  /// while the broker does not watch this stream. Returns busy at once when it
  /// cannot lead (not leader_reads, on the broker thread, the broker or another
  /// thread reading, not yet framed, closed, frames handed to the broker not yet
  /// dispatched). A write to `wake_fd` (an eventfd; -1: none) makes it check `done()`
  /// again. Never closes the stream itself: on EOF or an error it steps down and the
  /// broker, watching again, finds out.
  ///
  /// `begun`: begin_lead() succeeded on this thread; lead() goes on from there (or
  /// begins again if this thread has stepped down meanwhile: a send that waited for
  /// the output queue to drain steps its thread down first, so that the broker reads
  /// what the child sends while it waits).
  lead_status lead(const take_fn& take, const std::function<bool()>& done,
                   std::optional<std::chrono::steady_clock::time_point> deadline, int wake_fd,
                   bool begun = false);
  /// lead() in steps: take this stream out of the broker's sight now, before the
  /// request whose reply the thread will wait for goes out (a reply quicker than the
  /// next few instructions would otherwise wake the broker, which then wakes the
  /// caller: one wake-up more, every time on one CPU). False when it cannot lead
  /// (as lead()). Every true must be followed, on this thread, by lead(..., true) or
  /// end_lead().
  bool begin_lead(int wake_fd);
  /// Step down, if `owner` still leads: the broker watches this stream again, at
  /// once if a thread follows (broker::follower), else within the broker's park limit
  /// unless another caller leads again first ("parked": docs/architecture.md).
  void end_lead(std::thread::id owner = std::this_thread::get_id());

  /// True once close() was called (or the stream closed by itself).
  bool closed() const;
  const std::string& name() const noexcept { return opts_.name; }
  std::size_t queued_bytes() const;

 private:
  stream(std::shared_ptr<broker> b, int read_fd, int write_fd, stream_options opts);
  /// Write `head` then `body` (either may be empty): inline if nothing is queued,
  /// else queued for the broker.
  bool enqueue(std::string head, std::string body);
  void arm_write();         // broker thread
  void set_write_interest(std::uint32_t events);  // broker thread; write_set_ only
  void flush_on_broker();   // broker thread
  bool write_some_locked(); // with wmu_ held; false on fatal error
  void do_read();                                  // broker thread
  void read_ready();                               // broker thread
  void handle_input(const char* data, std::size_t n);  // broker thread
  void parse_frames(std::span<const std::uint8_t> in);  // broker thread
  void close_on_broker(std::error_code reason, std::string detail);
  /// Hand a frame the leader read to the broker, to run on_message there in order.
  void hand_over(wire::message&& m);
  /// Have read_set_ report read_fd_'s input (muted_ false) or not (rmu_ held,
  /// read_fd_open_ true: close_on_broker closes the set and clears it in one locked step).
  void mute_locked(bool muted);
  bool unpark() override;  // broker::parkable
  /// end_lead(); `park` false: the broker watches again at once (the thread goes on
  /// to wait for what only the broker will read).
  void step_down(std::thread::id owner, bool park);
  /// Close read_fd_ now, or when the leader steps down (rmu_ held).
  void close_read_fd_locked();

  std::shared_ptr<broker> broker_;
  stream_options opts_;
  int read_fd_, write_fd_;
  /// leader_reads: the epoll sets the broker watches (through rd_ / wr_) instead of
  /// the descriptors, so that a leader can take read_fd_ out of the broker's sight.
  int read_set_ = -1, write_set_ = -1;
  boost::asio::posix::stream_descriptor rd_;
  std::unique_ptr<boost::asio::posix::stream_descriptor> wr_;  // null when write_fd == read_fd
  std::string raw_pending_;  // raw-phase bytes not yet consumed
  raw_fn raw_;
  wire::frame_parser parser_;
  message_fn on_message_;
  disconnect_fn on_disconnect_;

  mutable std::mutex wmu_;
  std::condition_variable drained_;
  std::deque<std::string> queue_;
  std::size_t head_off_ = 0;
  std::size_t queued_ = 0;
  bool write_armed_ = false;
  bool closing_ = false;  // close() was called off the broker thread; writes refused
  bool closed_ = false;   // close_on_broker() ran: descriptors closed, on_disconnect called
  std::error_code write_error_;

  // Reading (leader_reads). Lock order: rmu_ before wmu_.
  std::mutex rmu_;
  bool framed_ = false;         ///< past the raw phase: a leader may parse
  bool reading_ = false;        ///< the broker is reading and dispatching
  bool leader_ = false;         ///< a thread is leading
  bool muted_ = false;          ///< read_set_ not watching input: while leading, and parked
  bool park_listed_ = false;    ///< listed with broker::park() until unpark() says false
  bool broker_woken_ = false;   ///< read_ready() ran meanwhile and did not wait again
  int leader_wake_fd_ = -1;     ///< the leader's wake descriptor
  /// The leading thread (written under rmu_; read without it by enqueue(), where a
  /// leader about to wait for its own output to drain steps down first).
  std::atomic<std::thread::id> leader_thread_{};
  bool read_fd_open_ = true;    ///< read_fd_ still ours to close (leader_reads)
  bool close_read_fd_ = false;  ///< closed while leading: the leader closes read_fd_
  std::atomic<int> handed_over_{0};  ///< frames handed to the broker, not yet dispatched
};

}  // namespace mitogen
