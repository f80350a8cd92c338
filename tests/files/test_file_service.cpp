#include "mitogen/services/file_service.hpp"  // first: the header compiles on its own

#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "mitogen/mitogen.hpp"
#include "router_rig.hpp"

using namespace mitogen;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using clk = std::chrono::steady_clock;

namespace {

struct tmpdir {
  fs::path p;
  tmpdir() {
    std::string tmpl = (fs::temp_directory_path() / "mitogen-files-XXXXXX").string();
    p = ::mkdtemp(tmpl.data());
  }
  ~tmpdir() {
    std::error_code ec;
    fs::remove_all(p, ec);
  }
};

std::string random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(g());
  return s;
}

void put(const fs::path& p, const std::string& data) { std::ofstream(p, std::ios::binary) << data; }

std::string get(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

unsigned mode_of(const fs::path& p) {
  struct stat st {};
  REQUIRE(::stat(p.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

std::size_t temp_files(const fs::path& dir) {
  std::size_t n = 0;
  for (auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".tmp") ++n;
  return n;
}

/// Run Python `code` in the context (to swap in a misbehaving agent function).
void exec_in(const context& c, const std::string& code) {
  call_spec s;
  s.module = "builtins";
  s.function = "exec";
  s.args.items = {wire::str{code}, wire::dict{{{wire::str{"__name__"}, wire::str{"hostile"}}}}};
  c.call(std::move(s), 30s);
}

const char* hostile_prelude =
    "import sys\n"
    "core = sys.modules['mitogen.core']\n"
    "def header(data_to, size, handle):\n"
    "    core._send(data_to.context.context_id, data_to.dst_handle, core._FILE_HEADER.pack(size, 0o644), "
    "reply_to=handle)\n";

}  // namespace

TEST_CASE("send_file and fetch_file copy files byte for byte, mode included", "[files]") {
  test::router_rig t;
  tmpdir d;
  context c = local(*t.r);
  for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{65535}, std::size_t{65537},
                           std::size_t{3 * 65536 + 5}}) {
    CAPTURE(size);
    auto data = random_bytes(size, static_cast<unsigned>(size));
    put(d.p / "src", data);
    fs::permissions(d.p / "src", fs::perms(0640));
    file_options o;
    o.chunk_size = 65536;
    o.window = 2;
    CHECK(send_file(c, (d.p / "src").string(), (d.p / "remote").string(), o) == size);
    CHECK(get(d.p / "remote") == data);
    CHECK(mode_of(d.p / "remote") == 0640);
    o.mode = 0604;
    CHECK(fetch_file(c, (d.p / "remote").string(), (d.p / "back").string(), o) == size);
    CHECK(get(d.p / "back") == data);
    CHECK(mode_of(d.p / "back") == 0604);
    CHECK(temp_files(d.p) == 0);
  }
}

TEST_CASE("an empty file is sent every time, however fast the agent answers", "[files]") {
  // With nothing to receive, the agent acknowledges the start and replies at once;
  // when both arrived before send_file() looked, the reply was taken for an early
  // end ("ended the transfer before receiving everything", ~1 run in 8).
  test::router_rig t;
  tmpdir d;
  context c = local(*t.r);
  put(d.p / "empty", "");
  for (int i = 0; i < 40; ++i) {
    CAPTURE(i);
    CHECK(send_file(c, (d.p / "empty").string(), (d.p / ("remote" + std::to_string(i))).string(), {}) == 0);
    CHECK(fs::file_size(d.p / ("remote" + std::to_string(i))) == 0);
  }
}

TEST_CASE("copy_file streams from one context to another", "[files]") {
  test::router_rig t;
  tmpdir d;
  context a = local(*t.r);
  context b = local(*t.r);
  auto data = random_bytes(2500000, 9);
  put(d.p / "src", data);
  file_options o;
  o.chunk_size = 100000;
  o.window = 3;
  CHECK(copy_file(a, (d.p / "src").string(), b, (d.p / "dst").string(), o) == data.size());
  CHECK(get(d.p / "dst") == data);
}

TEST_CASE("a remote failure is a file_error with its errno, the destination untouched", "[files]") {
  test::router_rig t;
  tmpdir d;
  context c = local(*t.r);
  put(d.p / "dst", "old");
  try {
    fetch_file(c, (d.p / "missing").string(), (d.p / "dst").string());
    FAIL("no error");
  } catch (const file_error& e) {
    CHECK(e.error_number() == ENOENT);
    CHECK_THAT(e.what(), Catch::Contains("No such file or directory"));
  }
  put(d.p / "src", "new");
  try {
    send_file(c, (d.p / "src").string(), (d.p / "no-such-dir" / "dst").string());
    FAIL("no error");
  } catch (const file_error& e) {
    CHECK(e.error_number() == ENOENT);
  }
  CHECK(get(d.p / "dst") == "old");
  CHECK(temp_files(d.p) == 0);
  // The context is still usable.
  CHECK(send_file(c, (d.p / "src").string(), (d.p / "dst").string()) == 3);
  CHECK(get(d.p / "dst") == "new");
}

TEST_CASE("bad options are refused before anything happens", "[files]") {
  test::router_rig t;
  tmpdir d;
  context c = local(*t.r);
  put(d.p / "src", "x");
  file_options o;
  o.chunk_size = 0;
  CHECK_THROWS_AS(send_file(c, (d.p / "src").string(), (d.p / "dst").string(), o), file_error);
  o = {};
  o.mode = 010000;
  CHECK_THROWS_AS(send_file(c, (d.p / "src").string(), (d.p / "dst").string(), o), file_error);
  CHECK_FALSE(fs::exists(d.p / "dst"));
}

TEST_CASE("cancel stops a transfer and the receiver removes its temporary file", "[files]") {
  test::router_rig t;
  tmpdir d;
  context c = local(*t.r);
  {
    std::ofstream f(d.p / "big");
  }
  fs::resize_file(d.p / "big", std::uintmax_t{4} << 30);  // sparse
  std::atomic<bool> cancel{false};
  file_options o;
  o.chunk_size = 65536;
  o.window = 2;
  o.cancel = &cancel;
  std::thread stopper([&] {
    std::this_thread::sleep_for(300ms);
    cancel = true;
  });
  auto start = clk::now();
  try {
    send_file(c, (d.p / "big").string(), (d.p / "dst").string(), o);
    FAIL("no error");
  } catch (const file_error& e) {
    CHECK(e.error_number() == ECANCELED);
  }
  stopper.join();
  CHECK(clk::now() - start < 30s);
  CHECK_FALSE(fs::exists(d.p / "dst"));
  auto deadline = clk::now() + 30s;
  while (temp_files(d.p) && clk::now() < deadline) std::this_thread::sleep_for(10ms);
  CHECK(temp_files(d.p) == 0);
  call_spec s;
  s.module = "os";
  s.function = "getpid";
  CHECK(c.call(std::move(s), 30s).is<std::int64_t>());
}

TEST_CASE("fetch_file from a child that breaks the protocol fails and disconnects it", "[files][hostile]") {
  test::router_rig t;
  tmpdir d;
  std::string body;
  std::string expect;
  SECTION("a malformed header") {
    body =
        "def send(path, data_to, chunk_size, window):\n"
        "    core._send(data_to.context.context_id, data_to.dst_handle, b'short', reply_to=2000)\n"
        "    return 5\n";
    expect = "malformed file header";
  }
  SECTION("a chunk bigger than the chunk size") {
    body =
        "def send(path, data_to, chunk_size, window):\n"
        "    h, slot = core._inbox.open_slot()\n"
        "    header(data_to, 1 << 30, h)\n"
        "    core._send(data_to.context.context_id, data_to.dst_handle, b'x' * (chunk_size + 1))\n"
        "    return 0\n";
    expect = "sent a chunk of 65537 bytes";
  }
  SECTION("more than announced") {
    body =
        "def send(path, data_to, chunk_size, window):\n"
        "    h, slot = core._inbox.open_slot()\n"
        "    header(data_to, 3, h)\n"
        "    core._send(data_to.context.context_id, data_to.dst_handle, b'abcd')\n"
        "    return 3\n";
    expect = "more than the 3 bytes it announced";
  }
  SECTION("a success reply for fewer bytes than announced") {
    body =
        "def send(path, data_to, chunk_size, window):\n"
        "    h, slot = core._inbox.open_slot()\n"
        "    header(data_to, 10, h)\n"
        "    core._send(data_to.context.context_id, data_to.dst_handle, b'abcd')\n"
        "    return 10\n";
    expect = "ended the transfer after 4 of 10 bytes";
  }
  context c = local(*t.r);
  exec_in(c, std::string(hostile_prelude) + body + "core._file_send = send\n");
  file_options o;
  o.chunk_size = 65536;
  o.idle_timeout = 30s;
  try {
    fetch_file(c, "/etc/hostname", (d.p / "dst").string(), o);
    FAIL("no error");
  } catch (const file_error& e) {
    CHECK_THAT(e.what(), Catch::Contains(expect));
  }
  CHECK(fs::is_empty(d.p));
}

TEST_CASE("a child that stops sending is given up on after idle_timeout", "[files][hostile]") {
  test::router_rig t;
  tmpdir d;
  context c = local(*t.r);
  exec_in(c, std::string(hostile_prelude) +
                 "import time\n"
                 "def send(path, data_to, chunk_size, window):\n"
                 "    h, slot = core._inbox.open_slot()\n"
                 "    header(data_to, 100, h)\n"
                 "    time.sleep(3600)\n"
                 "core._file_send = send\n");
  file_options o;
  o.idle_timeout = 1s;
  auto start = clk::now();
  CHECK_THROWS_WITH(fetch_file(c, "/etc/hostname", (d.p / "dst").string(), o), Catch::Contains("no progress"));
  CHECK(clk::now() - start >= 900ms);
  CHECK(clk::now() - start < 30s);
  CHECK(fs::is_empty(d.p));
}
