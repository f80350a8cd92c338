// Log records on their way to Python's logging.
//
// The broker thread must never take the GIL (a Python thread holding it while
// waiting on the broker would deadlock), so records forwarded by contexts and the
// core's own spdlog output are queued here, in C++, and a Python daemon thread
// (mitogen_native.core._LogPump) drains the queue into `logging`.
#include <condition_variable>
#include <deque>
#include <mutex>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

struct log_record {
  std::uint32_t context_id;
  std::string context_name;  // empty with from_core
  std::string logger;
  int level;
  std::string text;
  bool from_core;
};

class log_queue {
 public:
  void push(log_record&& r) {
    {
      std::lock_guard lk(mu_);
      if (closed_) return;
      // Bounded: a program that never lets the pump run must not grow without end.
      if (q_.size() >= max_records) {
        q_.pop_front();
        ++dropped_;
      }
      q_.push_back(std::move(r));
    }
    cv_.notify_one();
  }

  /// Everything queued, waiting up to `wait` for the first record. nullopt once closed
  /// and empty.
  std::optional<std::deque<log_record>> take(std::chrono::milliseconds wait, std::size_t& dropped) {
    std::unique_lock lk(mu_);
    cv_.wait_for(lk, wait, [&] { return !q_.empty() || closed_; });
    if (q_.empty() && closed_) return std::nullopt;
    dropped = std::exchange(dropped_, 0);
    return std::exchange(q_, {});
  }

  void close() {
    {
      std::lock_guard lk(mu_);
      closed_ = true;
    }
    cv_.notify_all();
  }

 private:
  static constexpr std::size_t max_records = 100000;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<log_record> q_;
  std::size_t dropped_ = 0;
  bool closed_ = false;
};

log_queue& queue() {
  // Leaked: a broker thread may still log while static destructors run at exit.
  static auto* q = new log_queue();
  return *q;
}

int python_level(spdlog::level::level_enum l) {
  switch (l) {
    case spdlog::level::trace: return 5;
    case spdlog::level::debug: return 10;
    case spdlog::level::info: return 20;
    case spdlog::level::warn: return 30;
    case spdlog::level::err: return 40;
    case spdlog::level::critical: return 50;
    default: return 20;
  }
}

spdlog::level::level_enum spdlog_level(int python) {
  if (python <= 5) return spdlog::level::trace;
  if (python <= 10) return spdlog::level::debug;
  if (python <= 20) return spdlog::level::info;
  if (python <= 30) return spdlog::level::warn;
  if (python <= 40) return spdlog::level::err;
  return spdlog::level::critical;
}

/// The core logs through spdlog's default logger; in a Python process that output
/// belongs to the `mitogen` logger.
class queue_sink final : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    queue().push({0, {}, "mitogen", python_level(msg.level), std::string(msg.payload.data(), msg.payload.size()), true});
  }
  void flush_() override {}
};

py::object utf8(const std::string& s) {
  return py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace"));
}

py::object drain(std::chrono::milliseconds wait) {
  std::size_t dropped = 0;
  std::optional<std::deque<log_record>> batch;
  {
    nogil g;
    batch = queue().take(wait, dropped);
  }
  if (!batch) return py::none();
  py::list out;
  if (dropped)
    out.append(py::make_tuple(py::none(), 0, "mitogen", 30,
                              std::to_string(dropped) + " log records dropped: the log queue was full"));
  for (auto& r : *batch) {
    py::object name = r.from_core ? py::object(py::none()) : utf8(r.context_name);
    out.append(py::make_tuple(name, r.context_id, utf8(r.logger), r.level, utf8(r.text)));
  }
  return out;
}

}  // namespace

void push_context_log(std::uint32_t context_id, const std::string& context_name, const std::string& logger, int level,
                      const std::string& text) {
  queue().push({context_id, context_name, logger, level, text, false});
}

void register_logging(py::module_& m) {
  auto logger = std::make_shared<spdlog::logger>("mitogen", std::make_shared<queue_sink>());
  logger->set_level(spdlog::level::info);
  spdlog::set_default_logger(logger);

  m.def(
      "_log_wait", [](double timeout_s) { return drain(std::chrono::milliseconds(static_cast<long>(timeout_s * 1000))); },
      py::arg("timeout"),
      "Queued log records as (context_name|None, context_id, logger, level, text) tuples, waiting up to "
      "`timeout` seconds for the first; None once the queue is closed and empty.");
  m.def("_log_close", [] { queue().close(); }, "Stop accepting records; wakes the pump so it can exit.");
  m.def(
      "_set_core_log_level", [](int level) { spdlog::default_logger()->set_level(spdlog_level(level)); },
      py::arg("level"), "Lowest Python logging level the core reports.");
}

}  // namespace mitogen::python
