#include "mitogen/services/module_responder.hpp"  // first: the header compiles on its own

#include <unistd.h>
#include <zlib.h>

#include <catch2/catch.hpp>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "mitogen/mitogen.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using clk = std::chrono::steady_clock;

namespace {

using rig = test::router_rig;

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

/// A temp tree: `served/` is what the responder serves, `outside/` is not.
struct tree {
  fs::path root;
  fs::path served;
  fs::path outside;

  tree() {
    std::string tmpl = (fs::temp_directory_path() / "mitogen-mr-XXXXXX").string();
    root = ::mkdtemp(tmpl.data());
    served = root / "onlyhere";
    outside = root / "outside";
    write(served / "pkg" / "__init__.py", "VERSION = 3\n");
    write(served / "pkg" / "mod.py",
          "\"\"\"Docstring mentioning\nimport secretmod\n\"\"\"\n"
          "from . import sibling\n"
          "from pkg.sub import leaf\n"
          "import helper_top\n\n"
          "def fn(x):\n"
          "    return sibling.double(x) + leaf.ONE + helper_top.TEN\n");
    write(served / "pkg" / "sibling.py", "def double(x):\n    return 2 * x\n");
    write(served / "pkg" / "sub" / "__init__.py", "");
    write(served / "pkg" / "sub" / "leaf.py", "ONE = 1\n");
    write(served / "pkg" / "sub" / "multi.py",
          "from .. import (sibling,\n"
          "                mod)\n"
          "import helper_top as h, \\\n"
          "    secretmod\n"
          "from ..sub.leaf import ONE  # a comment\n"
          "x = 'import not_a_module'\n"
          "def f():\n"
          "    import pkg.sub\n");
    write(served / "pkg" / "native.so", "not python");
    write(served / "pkg" / "notpkg" / "data.txt", "x");
    write(served / "helper_top.py", "TEN = 10\n");
    write(served / "secretmod.py", "def fn():\n    return 'secret'\n");
    // A probe that sends raw GET_MODULE requests, bypassing the importer's checks.
    write(served / "probe.py",
          "import mitogen.core as core\n"
          "def ask(name):\n"
          "    imp = core._importer\n"
          "    with imp._lock:\n"
          "        imp._cache.pop(name, None)\n"
          "    slot = core._Slot()\n"
          "    imp.request(name, lambda: core._inbox.deliver(slot, None))\n"
          "    core._inbox.wait(slot)\n"
          "    tup = imp.cached(name)[0]\n"
          "    return [tup[1], tup[2], tup[3] is not None]\n"
          "def present(name):\n"
          "    return sorted(core._importer._present.get(name, []))\n");
    write(outside / "secret.py", "SECRET = 'leaked'\n");
    write(outside / "evilpkg" / "__init__.py", "SECRET = 'leaked'\n");
    fs::create_symlink(outside / "secret.py", served / "evil.py");
    fs::create_directory_symlink(outside / "evilpkg", served / "evilpkg");
    write(root / "script.py",
          "import os\n\n"
          "def pid_and_name():\n"
          "    return os.getpid(), __name__\n\n"
          "if __name__ == '__main__':\n"
          "    raise SystemExit('the guarded block ran')\n");
    write(root / "unguarded.py", "def f():\n    return 1\n");
  }
  ~tree() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
};

wire::value call(const context& c, const std::string& module, const std::string& function, wire::tuple args = {}) {
  return c.call({.module = module, .function = function, .args = std::move(args)}, 30s);
}

/// probe.ask(name) in `c`: [pkg_present, path, has_source] of the answer.
wire::list ask(const context& c, const std::string& name) {
  return call(c, "probe", "ask", {{wire::str{name}}}).as<wire::list>();
}

bool negative(const wire::list& answer) {
  return answer.items[0].is<wire::none>() && answer.items[1].is<wire::none>() &&
         answer.items[2] == wire::value{false};
}

std::string remote_type(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const call_error& e) {
    return e.type_name();
  }
  return "(no error)";
}

std::string inflate(const wire::value& v) {
  const auto& z = v.as<wire::blob>().data;
  std::string out(1 << 16, '\0');
  uLongf len = out.size();
  REQUIRE(::uncompress(reinterpret_cast<Bytef*>(out.data()), &len, reinterpret_cast<const Bytef*>(z.data()),
                       z.size()) == Z_OK);
  out.resize(len);
  return out;
}

std::vector<std::string> strs(const wire::value& v) {
  std::vector<std::string> out;
  for (auto& item : v.as<wire::list>().items) out.push_back(item.as<wire::str>().utf8);
  return out;
}

}  // namespace

TEST_CASE("a function in a module that only the controller has", "[module_responder]") {
  rig t;
  tree d;
  auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
  context c = local(*t.r);
  CHECK(call(c, "pkg.mod", "fn", {{std::int64_t{20}}}).as<std::int64_t>() == 40 + 1 + 10);
  CHECK(call(c, "pkg.sibling", "double", {{std::int64_t{4}}}).as<std::int64_t>() == 8);

  // A package: empty __path__, and the child knows its submodules (sources only).
  CHECK(call(c, "builtins", "eval", {{wire::str{"__import__('pkg').__path__"}}}) == wire::value{wire::list{}});
  CHECK(strs(call(c, "probe", "present", {{wire::str{"pkg"}}})) ==
        std::vector<std::string>{"mod", "sibling", "sub"});
  CHECK(call(c, "builtins", "eval", {{wire::str{"__import__('pkg.sub.leaf').sub.leaf.__file__"}}}) ==
        wire::value{wire::str{"master:" + (d.served / "pkg" / "sub" / "leaf.py").string()}});
}

TEST_CASE("the LOAD_MODULE payload has upstream's shape", "[module_responder]") {
  rig t;
  tree d;
  auto resp = module_responder::create(t.r, {.search_path = {"/nonexistent", d.served.string()}});

  auto pkg = wire::decode(resp->payload_for("pkg"));
  REQUIRE(pkg);
  auto& f = pkg.v.as<wire::tuple>().items;
  REQUIRE(f.size() == 5);
  CHECK(f[0] == wire::value{wire::str{"pkg"}});
  CHECK(strs(f[1]) == std::vector<std::string>{"mod", "sibling", "sub"});
  CHECK(f[2] == wire::value{wire::str{(d.served / "pkg" / "__init__.py").string()}});
  REQUIRE(f[3].is<wire::blob>());
  CHECK(inflate(f[3]) == "VERSION = 3\n");
  CHECK(strs(f[4]).empty());

  // A module: no submodule list; related = what it imports (closure within its
  // package, parents included), not what its docstring mentions.
  auto mod = wire::decode(resp->payload_for("pkg.mod")).v.as<wire::tuple>().items;
  CHECK(mod[1].is<wire::none>());
  CHECK(strs(mod[4]) == std::vector<std::string>{"helper_top", "pkg", "pkg.sibling", "pkg.sub", "pkg.sub.leaf"});

  // Negative: (fullname, None, None, None, ()).
  auto neg = wire::decode(resp->payload_for("no_such_mod")).v;
  CHECK(neg == wire::value{wire::tuple{{wire::str{"no_such_mod"}, wire::none{}, wire::none{}, wire::none{},
                                        wire::tuple{}}}});
  // Native extensions and directories without __init__.py are not modules here.
  CHECK(wire::decode(resp->payload_for("pkg.native")).v.as<wire::tuple>().items[2].is<wire::none>());
  CHECK(wire::decode(resp->payload_for("pkg.notpkg")).v.as<wire::tuple>().items[2].is<wire::none>());
}

TEST_CASE("import statements are found by a line scan", "[module_responder]") {
  rig t;
  tree d;
  auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
  auto related = [&](const std::string& name) {
    return strs(wire::decode(resp->payload_for(name)).v.as<wire::tuple>().items[4]);
  };
  // Parenthesised and continued lines, relative levels, aliases; parents and the
  // closure within the package; text in strings ignored.
  CHECK(related("pkg.sub.multi") == std::vector<std::string>{"helper_top", "pkg", "pkg.mod", "pkg.sibling",
                                                              "pkg.sub", "pkg.sub.leaf", "secretmod"});
  CHECK(related("helper_top").empty());
}

TEST_CASE("each module crosses each link once", "[module_responder]") {
  rig t;
  tree d;
  auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
  context a = local(*t.r);
  CHECK(call(a, "pkg.mod", "fn", {{std::int64_t{1}}}).as<std::int64_t>() == 13);
  // 'pkg', then 'pkg.mod' (which brings pkg.sibling, pkg.sub and pkg.sub.leaf
  // along), then 'helper_top': another top-level package is not pushed, as upstream.
  auto s = resp->get_stats();
  CHECK(s.requests == 3);
  CHECK(s.modules_sent == 6);
  CHECK(s.negatives_sent == 0);
  const std::vector<std::string> all{"helper_top", "pkg", "pkg.mod", "pkg.sibling", "pkg.sub", "pkg.sub.leaf"};
  CHECK(resp->sent_to(a.id()) == all);

  // Everything else is already in the child: no more requests, no more answers.
  CHECK(call(a, "pkg.sibling", "double", {{std::int64_t{2}}}).as<std::int64_t>() == 4);
  CHECK(call(a, "builtins", "eval", {{wire::str{"__import__('pkg.sub.leaf').sub.leaf.ONE"}}}).as<std::int64_t>() == 1);
  CHECK(resp->get_stats().requests == 3);
  CHECK(resp->get_stats().modules_sent == 6);

  // Another context gets its own copy, once.
  context b = local(*t.r);
  CHECK(call(b, "pkg.mod", "fn", {{std::int64_t{1}}}).as<std::int64_t>() == 13);
  CHECK(resp->get_stats().modules_sent == 12);
  CHECK(resp->sent_to(b.id()) == all);
}

TEST_CASE("a missing module fails quickly with ModuleNotFoundError", "[module_responder]") {
  rig t;
  tree d;
  auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
  context c = local(*t.r);
  for (int i = 0; i < 2; ++i) {
    auto t0 = clk::now();
    CHECK(remote_type([&] { call(c, "no_such_module_xyz", "f"); }) == "builtins.ModuleNotFoundError");
    CHECK(clk::now() - t0 < 10s);  // an answer, not a wait for some timeout
  }
  // Asked once (the child caches the negative answer); nothing was refused.
  CHECK(resp->get_stats().requests == 1);
  CHECK(resp->get_stats().negatives_sent == 1);
  CHECK(resp->get_stats().refused == 0);
  // Modules outside the served directories are not served, even if they exist.
  CHECK(negative(ask(c, "os")));
}

TEST_CASE("hostile names and symlink escapes are refused", "[module_responder]") {
  rig t;
  tree d;
  auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
  context c = local(*t.r);
  const std::vector<std::string> names{"../../etc/shadow", "/etc/passwd", "os.path/../x", "pkg..mod", ".pkg",
                                      "pkg.", "", "pkg/mod", "evil", "evilpkg", std::string(600, 'a'),
                                      std::string("pkg\x01"), std::string("p\xc3\xa9kg")};
  for (const auto& name : names) {
    INFO("name: " << name);
    CHECK(negative(ask(c, name)));
  }
  // All were refused (bad names, symlinks out of the served directory): the long
  // and non-ASCII ones with dead replies, the rest with negative answers.
  CHECK(resp->get_stats().refused == 13);
  CHECK(remote_type([&] { call(c, "evil", "f"); }) == "builtins.ModuleNotFoundError");
  // The context is still served.
  CHECK(call(c, "pkg.sibling", "double", {{std::int64_t{3}}}).as<std::int64_t>() == 6);
}

TEST_CASE("allow and deny lists", "[module_responder]") {
  rig t;
  tree d;
  SECTION("deny wins") {
    auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}, .deny = {"secret", "pkg.sub"}});
    context c = local(*t.r);
    CHECK(remote_type([&] { call(c, "secretmod", "fn"); }) == "builtins.ModuleNotFoundError");
    CHECK(negative(ask(c, "secretmod")));
    CHECK(negative(ask(c, "pkg.sub.leaf")));
    CHECK(call(c, "pkg.sibling", "double", {{std::int64_t{1}}}).as<std::int64_t>() == 2);
    // Denied modules are not pushed as related modules either: the child holds
    // only negative answers for them.
    CHECK(remote_type([&] { call(c, "pkg.mod", "fn", {{std::int64_t{1}}}); }) == "builtins.ModuleNotFoundError");
    CHECK(call(c, "builtins", "eval",
               {{wire::str{"[n for n, e in __import__('mitogen.core').core._importer._cache.items()"
                           " if n.startswith('pkg.sub') and e[0][2] is not None]"}}}) == wire::value{wire::list{}});
  }
  SECTION("allow restricts") {
    auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}, .allow = {"pkg", "probe"}});
    context c = local(*t.r);
    CHECK(call(c, "pkg.sibling", "double", {{std::int64_t{1}}}).as<std::int64_t>() == 2);
    CHECK(remote_type([&] { call(c, "secretmod", "fn"); }) == "builtins.ModuleNotFoundError");
    CHECK(remote_type([&] { call(c, "helper_top", "f"); }) == "builtins.ModuleNotFoundError");
  }
}

TEST_CASE("functions of the main script are callable as __main__", "[module_responder]") {
  rig t;
  tree d;
  SECTION("guarded script") {
    auto resp = module_responder::create(
        t.r, {.search_path = {d.served.string()}, .main_script = (d.root / "script.py").string()});
    context c = local(*t.r);
    auto v = call(c, "__main__", "pid_and_name").as<wire::tuple>().items;
    CHECK(v[0] != wire::value{std::int64_t{::getpid()}});
    CHECK(v[1] == wire::value{wire::str{"__main__"}});
    CHECK(call(c, "__main__", "pid_and_name").as<wire::tuple>().items[0] == v[0]);
    CHECK(resp->get_stats().requests == 1);
    // The guarded block was cut: it is not even in the source sent.
    auto main = wire::decode(resp->payload_for("__main__")).v.as<wire::tuple>().items;
    CHECK(main[2] == wire::value{wire::str{(d.root / "script.py").string()}});
    CHECK(inflate(main[3]) == "import os\n\ndef pid_and_name():\n    return os.getpid(), __name__\n\n");
  }
  SECTION("unguarded script is refused") {
    auto resp = module_responder::create(
        t.r, {.search_path = {d.served.string()}, .main_script = (d.root / "unguarded.py").string()});
    context c = local(*t.r);
    CHECK(remote_type([&] { call(c, "__main__", "f"); }) == "builtins.ModuleNotFoundError");
    CHECK(resp->get_stats().refused == 1);
  }
  SECTION("no script") {
    auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
    context c = local(*t.r);
    CHECK(remote_type([&] { call(c, "__main__", "f"); }) == "builtins.ModuleNotFoundError");
  }
}

TEST_CASE("search path order and a responder going away", "[module_responder]") {
  rig t;
  tree d;
  write(d.root / "first" / "dup.py", "WHERE = 'first'\n");
  write(d.root / "second" / "dup.py", "WHERE = 'second'\n");
  write(d.root / "second" / "only2.py", "WHERE = 'second'\n");
  auto resp = module_responder::create(
      t.r, {.search_path = {(d.root / "first").string(), (d.root / "second").string()}});
  context c = local(*t.r);
  auto where = [&](const std::string& m) {
    return call(c, "builtins", "eval", {{wire::str{"__import__('" + m + "').WHERE"}}}).as<wire::str>().utf8;
  };
  CHECK(where("dup") == "first");
  CHECK(where("only2") == "second");
  resp.reset();  // no responder: requests get dead replies, imports fail at once
  auto t0 = clk::now();
  CHECK(remote_type([&] { where("other"); }) == "builtins.ModuleNotFoundError");
  CHECK(clk::now() - t0 < 10s);  // an answer, not a wait for some timeout
}

// ---- the worker thread, the resolver, and answers that follow the files -------

namespace {

/// A resolver backed by a table the test changes while contexts run, counting its
/// calls and the threads they came on.
struct table_resolver {
  std::mutex mu;
  std::map<std::string, module_source> modules;
  int calls = 0;
  bool on_broker = false;
  std::shared_ptr<broker> b;

  void set(const std::string& name, module_source s) {
    std::lock_guard lk(mu);
    modules[name] = std::move(s);
  }
  void erase(const std::string& name) {
    std::lock_guard lk(mu);
    modules.erase(name);
  }
  int count() {
    std::lock_guard lk(mu);
    return calls;
  }
  bool called_on_broker() {
    std::lock_guard lk(mu);
    return on_broker;
  }
  module_resolver fn() {
    return [this](const std::string& name) -> std::optional<module_source> {
      std::lock_guard lk(mu);
      ++calls;
      on_broker = on_broker || b->on_broker_thread();
      auto it = modules.find(name);
      if (it == modules.end()) return std::nullopt;
      return it->second;
    };
  }
};

/// Holds the resolver inside a call for one name until released.
struct gate {
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false;
  bool released = false;
  void enter() {
    std::unique_lock lk(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lk, [&] { return released; });
  }
  bool wait_entered(std::chrono::seconds bound) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, bound, [&] { return entered; });
  }
  void release() {
    std::lock_guard lk(mu);
    released = true;
    cv.notify_all();
  }
};

module_source text(const std::string& path, const std::string& src) { return {path, src, false, {}}; }
module_source file(const fs::path& p) { return {p.string(), std::nullopt, false, {}}; }

std::string sent_source(module_responder& resp, const std::string& name) {
  auto t = wire::decode(resp.payload_for(name)).v.as<wire::tuple>().items;
  return t[3].is<wire::none>() ? std::string("<negative>") : inflate(t[3]);
}

}  // namespace

TEST_CASE("requests are handled on the worker thread and never on the broker thread", "[module_responder]") {
  rig t;
  tree d;
  table_resolver res;
  res.b = t.b;
  gate g;
  res.set("probe", file(d.served / "probe.py"));
  res.set("slowmod", text("/virtual/slowmod.py", "def f():\n    return 'slow'\n"));
  auto inner = res.fn();
  auto resp = module_responder::create(t.r, {.resolver = [&](const std::string& name) {
                                               if (name == "slowmod") g.enter();
                                               return inner(name);
                                             }});
  context a = local(*t.r);
  context b = local(*t.r);
  auto rx = a.call_async({.module = "slowmod", .function = "f"});
  REQUIRE(g.wait_entered(30s));
  // The resolver is stuck inside a's request: the broker still carries b's calls.
  CHECK(call(b, "os", "getpid").as<std::int64_t>() != ::getpid());
  CHECK(rx->size() == 0);
  g.release();
  CHECK(a.result(rx->get(30s)) == wire::value{wire::str{"slow"}});
  CHECK_FALSE(res.called_on_broker());
  // The module's path and source are the resolver's.
  CHECK(call(a, "builtins", "eval", {{wire::str{"__import__('slowmod').__file__"}}}) ==
        wire::value{wire::str{"master:/virtual/slowmod.py"}});
}

TEST_CASE("the resolver is asked at request time and negative answers are not cached", "[module_responder]") {
  rig t;
  tree d;
  table_resolver res;
  res.b = t.b;
  auto resp = module_responder::create(t.r, {.resolver = res.fn()});
  context a = local(*t.r);
  CHECK(remote_type([&] { call(a, "latecomer", "f"); }) == "builtins.ModuleNotFoundError");
  // The program can import it now: a context asking after that gets it (a keeps
  // its negative answer, as any context keeps what it was sent).
  write(d.root / "late" / "latecomer.py", "def f():\n    return 'here'\n");
  res.set("latecomer", file(d.root / "late" / "latecomer.py"));
  context b = local(*t.r);
  CHECK(call(b, "latecomer", "f") == wire::value{wire::str{"here"}});
  // Once served, the same bytes are served again without asking (no Python on the
  // hot path), even if the program lost the module since: nothing new is given out.
  res.erase("latecomer");
  context c = local(*t.r);
  CHECK(call(c, "latecomer", "f") == wire::value{wire::str{"here"}});
  // Changed or removed, it is looked up again, and refused now.
  fs::remove(d.root / "late" / "latecomer.py");
  context e = local(*t.r);
  CHECK(remote_type([&] { call(e, "latecomer", "f"); }) == "builtins.ModuleNotFoundError");
}

TEST_CASE("answers are cached by content: an edit reaches the contexts started after it", "[module_responder]") {
  rig t;
  tree d;
  SECTION("a file the resolver names: no resolver call while it is unchanged") {
    table_resolver res;
    res.b = t.b;
    const fs::path mod = d.root / "live" / "edited.py";
    write(mod, "def v():\n    return 'one'\n");
    res.set("edited", file(mod));
    auto resp = module_responder::create(t.r, {.resolver = res.fn()});
    context a = local(*t.r);
    CHECK(call(a, "edited", "v") == wire::value{wire::str{"one"}});
    CHECK(res.count() == 1);
    context b = local(*t.r);
    CHECK(call(b, "edited", "v") == wire::value{wire::str{"one"}});
    CHECK(res.count() == 1);  // the hot path: no resolver (no Python), no rebuild
    CHECK(resp->get_stats().builds == 1);
    // Same size, same second: only the content tells them apart.
    write(mod, "def v():\n    return 'two'\n");
    context c = local(*t.r);
    CHECK(call(c, "edited", "v") == wire::value{wire::str{"two"}});
    CHECK(res.count() == 2);
    CHECK(resp->get_stats().builds == 2);
    // A context that already had it keeps its copy.
    CHECK(call(a, "edited", "v") == wire::value{wire::str{"one"}});
  }
  SECTION("a source the resolver gives: asked each time, rebuilt only if it changed") {
    table_resolver res;
    res.b = t.b;
    res.set("given", text("<given>", "X = 1\n"));
    auto resp = module_responder::create(t.r, {.resolver = res.fn()});
    CHECK(sent_source(*resp, "given") == "X = 1\n");
    CHECK(sent_source(*resp, "given") == "X = 1\n");
    CHECK(res.count() == 2);
    CHECK(resp->get_stats().builds == 1);
    res.set("given", text("<given>", "X = 2\n"));
    CHECK(sent_source(*resp, "given") == "X = 2\n");
    CHECK(resp->get_stats().builds == 2);
  }
  SECTION("search_path mode: edits and files created later are seen too") {
    auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
    CHECK(sent_source(*resp, "helper_top") == "TEN = 10\n");
    write(d.served / "helper_top.py", "TEN = 11\n");
    CHECK(sent_source(*resp, "helper_top") == "TEN = 11\n");
    CHECK(sent_source(*resp, "born_later") == "<negative>");
    write(d.served / "born_later.py", "B = 1\n");
    CHECK(sent_source(*resp, "born_later") == "B = 1\n");
    CHECK(resp->get_stats().builds == 3);
    CHECK(sent_source(*resp, "born_later") == "B = 1\n");
    CHECK(resp->get_stats().builds == 3);
  }
}

TEST_CASE("what a resolver answers is checked before it is served", "[module_responder]") {
  rig t;
  tree d;
  table_resolver res;
  res.b = t.b;
  fs::create_symlink(d.outside / "secret.py", d.root / "linked.py");
  write(d.outside / "data.txt", "SECRET = 'leaked'\n");
  fs::create_symlink(d.outside / "data.txt", d.root / "txtlink.py");
  res.set("relative", {"served/helper_top.py", std::nullopt, false, {}});
  res.set("missing", file(d.root / "nope.py"));
  res.set("notpy", file(d.outside / "data.txt"));
  res.set("txtlink", file(d.root / "txtlink.py"));
  res.set("linked", file(d.root / "linked.py"));  // a symlink to a .py: the program imports it too
  res.set("nopath", text("", "X = 1\n"));
  res.set("ctlpath", text("a\nb", "X = 1\n"));
  res.set("huge", text("<huge>", std::string(2048, '#')));
  res.set("pkgnames", {"/virtual/pkgnames/__init__.py", "", true, {"ok", "bad.name", "../up", "", "9x", "also_ok"}});
  res.set("probe", file(d.served / "probe.py"));
  res.set("stdlibish.sub", text("<stdlibish>", "X = 1\n"));
  auto resp = module_responder::create(
      t.r, {.resolver = [&](const std::string& name) -> std::optional<module_source> {
              if (name == "raises") throw std::runtime_error("the finder broke");
              return res.fn()(name);
            },
            .deny = {"denied"},
            .excluded = {"stdlibish"},
            .max_source_size = 1024});
  context c = local(*t.r);
  for (const std::string name : {"relative", "missing", "notpy", "txtlink", "nopath", "ctlpath", "huge", "raises"}) {
    INFO("name: " << name);
    CHECK(negative(ask(c, name)));
  }
  CHECK(resp->get_stats().refused == 8);
  CHECK(sent_source(*resp, "linked") == "SECRET = 'leaked'\n");
  auto pkg = wire::decode(resp->payload_for("pkgnames")).v.as<wire::tuple>().items;
  CHECK(strs(pkg[1]) == std::vector<std::string>{"also_ok", "ok"});
  // Denied, excluded and malformed names never reach the resolver; excluded ones
  // are not refusals (every context has them itself).
  const int before = res.count();
  const auto refused = resp->get_stats().refused;
  CHECK(negative(ask(c, "stdlibish.sub")));
  CHECK(resp->get_stats().refused == refused);
  CHECK(negative(ask(c, "denied_mod")));
  CHECK(negative(ask(c, "../x")));
  CHECK(res.count() == before);
  // After all that the context is still served.
  CHECK(call(c, "builtins", "eval", {{wire::str{"__import__('linked').SECRET"}}}) ==
        wire::value{wire::str{"leaked"}});
}

TEST_CASE("a full request queue and a responder going away answer every waiter", "[module_responder]") {
  rig t;
  tree d;
  table_resolver res;
  res.b = t.b;
  gate g;
  write(d.served / "flood.py",
        "import mitogen.core as core\n"
        "def flood(names, expect):\n"
        "    imp = core._importer\n"
        "    slot = core._Slot()\n"
        "    count = [0]\n"
        "    def answered():\n"
        "        count[0] += 1\n"
        "        if count[0] == expect:\n"
        "            core._inbox.deliver(slot, None)\n"
        "    for name in names:\n"
        "        imp.request(name, answered)\n"
        "    if expect:\n"
        "        core._inbox.wait(slot)\n"
        "    return [n for n in names if imp.cached(n) is not None]\n");
  res.set("flood", file(d.served / "flood.py"));
  auto inner = res.fn();
  auto resp = std::make_optional(module_responder::create(
      t.r, {.resolver = [&](const std::string& name) {
              if (name == "gate") g.enter();
              return inner(name);
            },
            .max_pending = 2}));
  context a = local(*t.r);
  context b = local(*t.r);
  CHECK(call(b, "flood", "flood", {{wire::list{}, std::int64_t{0}}}) == wire::value{wire::list{}});
  auto held = a.call_async({.module = "gate", .function = "f"});
  REQUIRE(g.wait_entered(30s));
  // The worker is held inside the resolver: two requests wait, the other eight get
  // dead replies at once (the child takes them as "not found").
  wire::list names;
  for (int i = 0; i < 10; ++i) names.items.emplace_back(wire::str{"flooded" + std::to_string(i)});
  auto answered = call(b, "flood", "flood", {{names, std::int64_t{8}}}).as<wire::list>().items;
  CHECK(answered.size() == 8);
  CHECK(std::find(answered.begin(), answered.end(), wire::value{wire::str{"flooded0"}}) == answered.end());
  CHECK(std::find(answered.begin(), answered.end(), wire::value{wire::str{"flooded1"}}) == answered.end());
  CHECK(resp.value()->get_stats().refused == 8);
  // b's two queued requests and a's held one are answered when the responder goes,
  // even though the worker is stuck: destroying it waits for the resolver.
  auto rx = b.call_async({.module = "flood", .function = "flood", .args = {{names, std::int64_t{10}}}});
  std::thread destroyer([&] { resp.reset(); });
  g.release();
  destroyer.join();
  CHECK(b.result(rx->get(30s)).as<wire::list>().items.size() == 10);
  CHECK(remote_type([&] { a.result(held->get(30s)); }) == "builtins.ModuleNotFoundError");
}

TEST_CASE("a child that stops reading does not hold up the other children's imports", "[module_responder]") {
  rig t;
  tree d;
  // About 1 MiB that zlib shrinks little: 40 answers are far over a stream's 16 MiB
  // queue bound, past which a thread other than the broker's would block.
  std::string big = "BIG = '";
  std::uint32_t x = 12345;
  const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int i = 0; i < (1 << 20); ++i) {
    x = x * 1103515245u + 12345u;
    big.push_back(alphabet[(x >> 16) & 63]);
  }
  write(d.served / "big.py", big + "'\n");
  write(d.served / "hog.py",
        "import time\n"
        "import mitogen.core as core\n"
        "def ask_and_sleep(name, n):\n"
        "    for _ in range(n):\n"
        "        core._send(core.parent_id, core.GET_MODULE, name.encode(), reply_to=0)\n"
        "    time.sleep(300)\n");
  auto resp = module_responder::create(t.r, {.search_path = {d.served.string()}});
  context a = local(*t.r);
  context b = local(*t.r);
  // a asks for big.py 40 times, then sleeps in its call: nobody reads its stream.
  auto hog = a.call_async({.module = "hog", .function = "ask_and_sleep", .args = {{wire::str{"big"}, std::int64_t{40}}}});
  const auto deadline = clk::now() + 60s;
  while (resp->get_stats().requests < 41 && clk::now() < deadline) std::this_thread::sleep_for(10ms);
  CHECK(resp->get_stats().requests == 41);  // hog, then 40 x big: none left waiting
  CHECK(resp->get_stats().bytes_sent > 24u << 20);  // well over the 16 MiB bound
  // b is served meanwhile.
  CHECK(call(b, "pkg.sibling", "double", {{std::int64_t{5}}}).as<std::int64_t>() == 10);
  t.r->disconnect(a.id(), make_error_code(errc::protocol_error), "the test is over");
}
