#pragma once
/// FORWARD_LOG as a service of the router (private to the routing layer): decodes
/// each record a child forwards, rate-limits each child with token buckets (records
/// and bytes) so that none can drown the controller, and hands the record to the
/// sink (default: the spdlog logger). Our agent stays within half of both budgets
/// (it coalesces output lines and makes writers wait: core/agent/parts/30_messages.py, _Pacer), so only a
/// child that ignores that loses records. The router registers it on FORWARD_LOG at create() and tells it
/// when a context goes, so that the records it dropped are reported once.
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>

#include "mitogen/routing/router.hpp"

namespace mitogen::detail {

class log_forwarder {
 public:
  /// `name_of` names a context for messages (called on the broker thread).
  explicit log_forwarder(std::function<std::string(std::uint32_t)> name_of) : name_of_(std::move(name_of)) {}

  /// A FORWARD_LOG record from context `from_id` (broker thread).
  void on_record(std::uint32_t from_id, const std::string& data);
  /// Context `id` is gone: report what was dropped from it, forget it (broker thread).
  void context_gone(std::uint32_t id, const std::string& name);
  /// Any thread.
  void set_sink(log_sink sink);

  /// Bytes of records a child may send per second, and in one burst (besides
  /// router::log_rate records per second); the excess is dropped.
  static constexpr double byte_rate = 8.0 * 1024 * 1024;
  static constexpr double byte_burst = 32.0 * 1024 * 1024;

 private:
  struct bucket {
    double tokens = router::log_burst;
    double bytes = byte_burst;
    std::chrono::steady_clock::time_point refill = std::chrono::steady_clock::now();
    std::uint64_t dropped = 0;
    std::uint64_t dropped_bytes = 0;
  };
  std::function<std::string(std::uint32_t)> name_of_;
  std::unordered_map<std::uint32_t, bucket> buckets_;  // broker thread only
  std::mutex sink_mu_;
  log_sink sink_;
};

}  // namespace mitogen::detail
