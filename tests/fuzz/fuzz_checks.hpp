#pragma once
// The properties the fuzz targets check, shared with the regression test that replays the
// seed corpus and every input a fuzzer ever crashed on (test_fuzz_regressions.cpp).
// Each returns "" when every property held for `data`, else a description of the first
// that failed. Crashes and sanitizer reports are caught by the harness, not here.
#include <cstdint>
#include <span>
#include <string>

namespace mitogen_fuzz {

/// wire::frame_parser: the whole input at once and in arbitrary chunks gives the same
/// messages and verdict as an obvious reference parser, re-encoding the messages gives
/// back the bytes they came from, and `bad` is sticky.
/// Input: byte 0 picks the maximum message size, byte 1 seeds the chunking, the rest
/// is the stream.
std::string check_frame(std::span<const std::uint8_t> data);

/// wire::decode: a refusal carries no value; a success re-encodes to a pickle that
/// decodes to an equal value (NaN-aware) and re-encodes to the same bytes.
/// Input: the pickle.
std::string check_pickle(std::span<const std::uint8_t> data);

/// detail::marker_scanner, driven as local() drives it: it never consumes more than it
/// is given, never reports agent_ready before stage1_ready nor either twice, finds the
/// markers exactly where a plain search of the whole stream does, whatever the
/// chunking, and leaves exactly the bytes after MITO001 (and an upstream child's
/// "MITO002\n", if one follows) for the frame parser.
/// Input: byte 0 seeds the chunking, the rest is the child's stdout.
std::string check_bootstrap(std::span<const std::uint8_t> data);

}  // namespace mitogen_fuzz
