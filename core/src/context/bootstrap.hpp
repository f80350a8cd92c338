#pragma once
// Private: the bootstrap dance (docs/protocol.md, "Bootstrap").
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mitogen::detail {

/// The zlib-compressed agent, as sent after MITO000.
std::string_view compressed_agent();
/// Stage 1 source with the preamble length filled in (the `-c` argument).
std::string stage1_command();

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
  enum class event { none, stage1_ready, agent_ready };
  /// Feed the unconsumed bytes; `consumed` says how many may be dropped. Returns the
  /// event found (at most one per call; call again with the rest).
  event scan(std::string_view data, std::size_t& consumed);
  /// Bytes seen before/between the markers (bounded), for error messages.
  std::string noise() const { return noise_ + tail_; }

 private:
  int state_ = 0;
  std::string noise_;
  std::string tail_;  ///< unconsumed bytes that might start a marker
};

}  // namespace mitogen::detail
