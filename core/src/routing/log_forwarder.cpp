#include "log_forwarder.hpp"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace mitogen::detail {

void log_forwarder::on_record(std::uint32_t from_id, const std::string& data) {
  // A child may log a lot, but not drown the controller: a token bucket per child.
  auto& b = buckets_[from_id];
  auto now = std::chrono::steady_clock::now();
  const double dt = std::chrono::duration<double>(now - b.refill).count();
  b.tokens = std::min(router::log_burst, b.tokens + router::log_rate * dt);
  b.bytes = std::min(byte_burst, b.bytes + byte_rate * dt);
  b.refill = now;
  const auto size = static_cast<double>(data.size());
  if (b.tokens < 1.0 || b.bytes < size) {
    b.dropped_bytes += data.size();
    if (b.dropped++ == 0)
      spdlog::warn("mitogen: context {} ({}) sends more than {} log records per second or {} MiB per second; dropping the excess "
                   "(logged once)",
                   from_id, name_of_(from_id), router::log_rate, byte_rate / (1024 * 1024));
    return;
  }
  b.tokens -= 1.0;
  b.bytes -= size;
  // "name\0level\0text"; anything malformed is shown as it is.
  std::string logger = "?", text;
  int level = 20;
  auto a = data.find('\0');
  auto z = a == std::string::npos ? std::string::npos : data.find('\0', a + 1);
  if (z != std::string::npos) {
    logger = data.substr(0, a);
    try {
      level = std::stoi(data.substr(a + 1, z - a - 1));
    } catch (...) {
    }
    text = data.substr(z + 1);
  } else {
    text = data;
  }
  std::string name = name_of_(from_id);
  log_sink sink;
  {
    std::lock_guard lk(sink_mu_);
    sink = sink_;
  }
  if (sink) {
    sink(from_id, name, logger, level, text);
    return;
  }
  auto lvl = level >= 40 ? spdlog::level::err
             : level >= 30 ? spdlog::level::warn
             : level >= 20 ? spdlog::level::info
                           : spdlog::level::debug;
  spdlog::log(lvl, "[{}] {}: {}", name, logger, text);
}

void log_forwarder::context_gone(std::uint32_t id, const std::string& name) {
  auto it = buckets_.find(id);
  if (it == buckets_.end()) return;
  if (it->second.dropped)
    spdlog::warn("mitogen: dropped {} log records ({} bytes) from context {} ({})", it->second.dropped,
                 it->second.dropped_bytes, id, name);
  buckets_.erase(it);
}

void log_forwarder::set_sink(log_sink sink) {
  std::lock_guard lk(sink_mu_);
  sink_ = std::move(sink);
}

}  // namespace mitogen::detail
