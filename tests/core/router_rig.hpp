#pragma once
// Test helper: a broker and a router, shut down and joined when the test ends.
#include <memory>

#include "mitogen/io/broker.hpp"
#include "mitogen/routing/router.hpp"

namespace mitogen::test {

struct router_rig {
  std::shared_ptr<broker> b = std::make_shared<broker>();
  std::shared_ptr<router> r = router::create(b);
  ~router_rig() {
    b->shutdown();
    b->join();
  }
};

}  // namespace mitogen::test
