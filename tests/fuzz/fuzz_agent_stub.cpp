// The fuzz targets and test_fuzz_regressions compile bootstrap.cpp (for the marker
// scanner) without linking mitogen_context, whose generated agent_blob.cpp defines
// these: they stand in for the embedded agent, which nothing here sends.
#include <cstddef>

namespace mitogen::detail {
extern const unsigned char agent_z[] = {0};
extern const std::size_t agent_z_len = 0;
extern const unsigned char stage1_src[] = {0};
extern const std::size_t stage1_len = 0;
}  // namespace mitogen::detail
