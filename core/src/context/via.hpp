#pragma once
// Private: starting a context through another one (connect_options::via; docs/via.md).
#include <functional>
#include <string>
#include <system_error>

#include "mitogen/context/context.hpp"
#include "mitogen/context/local.hpp"
#include "mitogen/wire/value.hpp"

namespace mitogen::detail {

/// Ask `o.via` to start a context with connection method `method` of its agent
/// (core/agent/via/40_connect.py, _METHODS) and `method_options`; the common options of `o`
/// are added. Returns the new context, named "<via name>.<name the agent chose>".
/// Throws stream_error like local()/ssh(); `classify` may refine its code from the
/// agent's error text.
context connect_via(router& r, const connect_options& o, const std::string& method, wire::dict method_options,
                    std::function<std::error_code(std::error_code, const std::string&)> classify = {});

}  // namespace mitogen::detail
