#pragma once
/// Umbrella header: the public C++ API.
#include "mitogen/context/context.hpp"
#include "mitogen/context/local.hpp"
#include "mitogen/errors.hpp"
#include "mitogen/io/broker.hpp"
#include "mitogen/io/stream.hpp"
#include "mitogen/routing/receiver.hpp"
#include "mitogen/routing/router.hpp"
#include "mitogen/wire/constants.hpp"
#include "mitogen/wire/frame.hpp"
#include "mitogen/wire/message.hpp"
#include "mitogen/wire/pickle.hpp"
#include "mitogen/wire/value.hpp"
