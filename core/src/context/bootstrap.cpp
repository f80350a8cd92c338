#include "bootstrap.hpp"

#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/pickle.hpp"

namespace mitogen::detail {

extern const unsigned char agent_z[];
extern const std::size_t agent_z_len;
extern const unsigned char stage1_src[];
extern const std::size_t stage1_len;

std::string_view compressed_agent() { return {reinterpret_cast<const char*>(agent_z), agent_z_len}; }

std::string stage1_command() {
  std::string s(reinterpret_cast<const char*>(stage1_src), stage1_len);
  static constexpr std::string_view token = "PREAMBLE_LEN";
  auto pos = s.find(token);
  if (pos != std::string::npos) s.replace(pos, token.size(), std::to_string(agent_z_len));
  return s;
}

std::string preamble(const agent_config& cfg) {
  wire::list parents;
  for (auto id : cfg.parent_ids) parents.items.emplace_back(static_cast<std::int64_t>(id));
  wire::dict d;
  d.items.emplace_back(wire::str{"context_id"}, static_cast<std::int64_t>(cfg.context_id));
  d.items.emplace_back(wire::str{"parent_ids"}, std::move(parents));
  d.items.emplace_back(wire::str{"remote_name"}, wire::str{cfg.remote_name});
  d.items.emplace_back(wire::str{"debug"}, cfg.debug);
  d.items.emplace_back(wire::str{"log_level"}, static_cast<std::int64_t>(cfg.log_level));
  d.items.emplace_back(wire::str{"max_message_size"}, static_cast<std::int64_t>(cfg.max_message_size));
  wire::message m;
  m.dst_id = cfg.context_id;
  m.src_id = m.auth_id = cfg.parent_ids.empty() ? 0 : cfg.parent_ids.front();
  m.handle = wire::BOOTSTRAP;
  m.data = wire::encode(wire::value(std::move(d)));
  std::string out(compressed_agent());
  out += wire::encode_frame(m);
  return out;
}

marker_scanner::event marker_scanner::scan(std::string_view data, std::size_t& consumed) {
  static constexpr std::string_view markers[2] = {"MITO000\n", "MITO001\n"};
  consumed = 0;
  if (state_ >= 2) return event::none;
  auto marker = markers[state_];
  auto pos = data.find(marker);
  auto keep_noise = [&](std::string_view s) {
    if (noise_.size() < 4096) noise_.append(s.substr(0, 4096 - noise_.size()));
  };
  if (pos == std::string_view::npos) {
    // Keep a possible marker prefix at the end; everything before it is noise.
    std::size_t drop = data.size() > marker.size() ? data.size() - marker.size() : 0;
    keep_noise(data.substr(0, drop));
    tail_ = std::string(data.substr(drop));
    consumed = drop;
    return event::none;
  }
  keep_noise(data.substr(0, pos));
  tail_.clear();
  consumed = pos + marker.size();
  return state_++ == 0 ? event::stage1_ready : event::agent_ready;
}

}  // namespace mitogen::detail
