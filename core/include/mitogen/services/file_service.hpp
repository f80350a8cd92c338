#pragma once
/// File transfer between the controller and contexts (docs/files.md): a file is
/// streamed in raw chunks with credit-based flow control, so memory stays bounded
/// whatever its size, and lands under a temporary name that is renamed into place
/// only once complete and fsync()ed. On any failure the destination is left as it
/// was and the caller gets a file_error.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "mitogen/context/context.hpp"
#include "mitogen/errors.hpp"

namespace mitogen {

/// Options of send_file(), fetch_file() and copy_file().
struct file_options {
  /// Permission bits of the destination; default: the source's (& 07777).
  std::optional<std::uint32_t> mode;
  /// Owner and group of the destination, by name or decimal id; default: left to
  /// whoever writes it (the remote user for send_file, this process for fetch_file).
  std::optional<std::string> owner;
  std::optional<std::string> group;
  /// Bytes per chunk (one message each). At most the peer's max_message_size.
  std::size_t chunk_size = 1u << 20;
  /// Chunks the sender may have unacknowledged at once; the receiver acknowledges
  /// every window / 2. Memory on either side is about window * chunk_size.
  std::size_t window = 8;
  /// Fail when the peer shows no progress (no acknowledgement, no chunk, no reply)
  /// for this long.
  std::chrono::milliseconds idle_timeout{60000};
  /// Polled while waiting; set it (any thread) to abort the transfer.
  const std::atomic<bool>* cancel = nullptr;
};

/// A transfer failed. `error_number()` is the errno behind it when there is one
/// (ENOSPC, EACCES, ...: the remote one for a remote failure), else 0.
class file_error : public error {
 public:
  file_error(const std::string& what, int err = 0) : error(what), errno_(err) {}
  int error_number() const noexcept { return errno_; }

 private:
  int errno_;
};

/// Copy the controller's file `local_path` to `remote_path` in `ctx`. Returns the
/// number of bytes. Throws file_error (the destination is then as it was).
std::uint64_t send_file(const context& ctx, const std::string& local_path, const std::string& remote_path,
                        const file_options& opts = {});

/// Copy `remote_path` in `ctx` to the controller's `local_path`. Same guarantees.
std::uint64_t fetch_file(const context& ctx, const std::string& remote_path, const std::string& local_path,
                         const file_options& opts = {});

/// Copy `src_path` in context `src` to `dst_path` in context `dst`, streamed
/// through this router (nothing touches the controller's disk). Same guarantees.
std::uint64_t copy_file(const context& src, const std::string& src_path, const context& dst,
                        const std::string& dst_path, const file_options& opts = {});

}  // namespace mitogen
