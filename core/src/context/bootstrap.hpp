#pragma once
// Private: the bootstrap dance (docs/protocol.md, "Bootstrap"), shared by every
// connection method: local() and ssh() differ only in how the agent's stdin/stdout
// and stderr are obtained; everything after that is run_bootstrap().
#include <utility>  // before Asio (Boost 1.74 + C++20)

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "mitogen/context/context.hpp"
#include "mitogen/context/local.hpp"
#include "mitogen/io/stream.hpp"

namespace mitogen::detail {

/// The zlib-compressed agent, as sent after MITO000.
std::string_view compressed_agent();
/// Stage 1 source with the preamble length filled in (the `-c` argument).
std::string stage1_command();
/// Stage 1 as a one-line Python program without quotes, newlines or shell
/// metacharacters other than `(`, `)`, `;` and `"` (base64 inside a `-c` wrapper), for
/// command lines that pass through a remote login shell.
std::string stage1_oneliner();

/// Standard base64 (RFC 4648, with `=` padding unless `pad` is false).
std::string base64(std::string_view bytes, bool pad = true);

/// Config of a new agent, sent as the BOOTSTRAP frame.
struct agent_config {
  std::uint32_t context_id = 0;
  std::vector<std::uint32_t> parent_ids;
  std::string remote_name;
  bool debug = false;
  int log_level = 20;
  std::uint32_t max_message_size = 0;
};

/// The bytes written once MITO000 is seen: compressed agent + BOOTSTRAP frame.
std::string preamble(const agent_config& cfg);

/// Scans a child's stdout during bootstrap for the two markers.
class marker_scanner {
 public:
  /// stage1_ready: MITO000 seen, send the preamble. agent_ready: MITO001 seen, the
  /// context is up. framed: the first bytes after MITO001 arrived (an upstream
  /// child's "MITO002\n" is consumed here), everything from now on is frames.
  enum class event { none, stage1_ready, agent_ready, framed };
  /// Feed the unconsumed bytes; `consumed` says how many may be dropped. Returns the
  /// event found (at most one per call; call again with the rest). While only a
  /// prefix of "MITO002\n" follows MITO001 it consumes nothing and waits for more.
  event scan(std::string_view data, std::size_t& consumed);
  /// Bytes seen before/between the markers (bounded), for error messages.
  std::string noise() const { return noise_ + tail_; }

 private:
  int state_ = 0;
  std::string noise_;
  std::string tail_;  ///< unconsumed bytes that might start a marker
};

/// What the connecting thread waits on while a context boots. Filled from the broker
/// thread (stream, stderr reader, ssh session) and the connect timer; read by the
/// connecting thread. All members are guarded by `mu`.
struct boot_state {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool ok = false;
  bool stderr_eof = false;
  std::error_code ec;
  std::string why;
  std::string stderr_text;  ///< boot-time stderr, bounded, for the error message
  std::string phase;        ///< what the connection was doing ("SSH handshake"), for timeouts
  std::string note;         ///< extra detail for the error message ("exit status 127")
  /// The process's exit status is reported through set_exit_status(): a failed
  /// start waits (briefly) for it as for the last stderr.
  bool wants_status = false;
  bool status_known = false;

  /// First call wins; later calls are ignored. Any thread.
  void finish(bool success, std::error_code e = {}, std::string w = {});
  void set_phase(std::string p);
  void set_note(std::string n);
  /// Record how the process ended (a waitpid status) in `note`. Any thread.
  void set_exit_status(int status);
  /// Keep stderr bytes (bounded) for the error message; false (and nothing kept)
  /// once the start has succeeded.
  bool add_stderr(std::string_view bytes);
  /// No more stderr will come.
  void stderr_closed();
};

/// Splits a context's stderr into lines, logs each (warning: before the agent takes
/// over fd 2 anything there is an interpreter or transport error) and keeps the text
/// in the boot_state. Broker thread only.
class stderr_sink {
 public:
  stderr_sink(std::shared_ptr<boot_state> boot, std::string name)
      : boot_(std::move(boot)), name_(std::move(name)) {}
  void feed(std::string_view bytes);
  /// Log a final partial line and mark stderr closed. Idempotent.
  void close();

 private:
  std::shared_ptr<boot_state> boot_;
  std::string name_;
  std::string line_;
  bool closed_ = false;
  bool booting_ = true;
};

/// Read descriptor `fd` (taken over) into a stderr_sink until EOF, on `io`.
void start_stderr_reader(boost::asio::io_context& io, int fd, std::shared_ptr<boot_state> boot, std::string name);

/// Throws if `r` cannot start contexts now (shut down) or we are on its broker thread.
void check_can_connect(router& r, const char* method);

/// Everything run_bootstrap() needs.
struct boot_request {
  std::uint32_t id = 0;
  std::string name;         ///< context name (logs, error messages)
  std::string remote_name;  ///< the agent's name (argv[0] "mitogen:<remote_name>")
  std::shared_ptr<stream> s;  ///< connected to the agent's stdin/stdout; not started
  std::shared_ptr<boot_state> boot;
  const connect_options* opts = nullptr;
  /// Runs on the broker thread after the stream closed (reap the process, end the
  /// SSH session); must call `done` when finished.
  std::function<void(std::function<void()> done)> teardown;
  /// Optional: refine the error code of a failed start from the stderr text (e.g.
  /// OpenSSH's "Permission denied" becomes auth_failed).
  std::function<std::error_code(std::error_code, const std::string& stderr_text)> classify;
  /// Optional: what to write after MITO000 instead of preamble(config).
  std::optional<std::string> preamble;
  /// Optional: the reason shown for a code that `classify` changed (instead of the
  /// original failure's, e.g. "the context disconnected").
  std::function<std::string(std::error_code)> describe;
};

/// Attach `req.s` to the router as context `req.id`, answer MITO000 with the preamble,
/// wait for MITO001 (or a failure reported through `req.boot`, or the connect
/// timeout), and return the context. On failure close the stream (the teardown then
/// runs) and throw stream_error with stderr, stdout noise and the phase in the
/// message. Any thread but the broker's.
context run_bootstrap(router& r, boot_request req);

}  // namespace mitogen::detail
