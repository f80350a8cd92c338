#include "mitogen/context/connection_stack.hpp"  // first: the header compiles on its own

#include <catch2/catch.hpp>
#include <optional>

using namespace mitogen;

namespace {

wire::value s(const char* v) { return wire::str{v}; }

/// A hop dict from (key, value) pairs.
wire::value hop_of(std::initializer_list<std::pair<const char*, wire::value>> kv) {
  wire::dict d;
  for (auto& [k, v] : kv) d.items.emplace_back(wire::str{k}, v);
  return d;
}

wire::value stack_of(std::initializer_list<wire::value> hops) {
  wire::list l;
  for (auto& h : hops) l.items.push_back(h);
  return l;
}

std::string error_of(const wire::value& v) {
  try {
    parse_connection_stack(v);
  } catch (const stack_error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string key_of(const wire::value& v) { return stack_key(parse_connection_stack(v)); }

}  // namespace

TEST_CASE("connection stack: hops take the Python API's keyword arguments", "[mux][stack]") {
  auto st = parse_connection_stack(stack_of({
      hop_of({{"method", s("ssh")},
              {"hostname", s("web1")},
              {"port", std::int64_t{2222}},
              {"username", s("deploy")},
              {"password", wire::secret{"hunter2"}},
              {"identity_file", s("/k/id")},
              {"check_host_keys", s("accept")},
              {"connect_timeout", 7.5},
              {"keepalive_interval", std::int64_t{5}},
              {"python_path", s("/usr/bin/python3")},
              {"transport", s("libssh2")},
              {"debug", wire::none{}}}),
      hop_of({{"method", s("sudo")}, {"username", s("root")}, {"sudo_args", s("-H -E")}, {"password", s("pw")}}),
      hop_of({{"method", s("su")}, {"username", s("bob")}, {"password_prompt", s("Mot de passe")}}),
  }));
  REQUIRE(st.size() == 3);
  const auto& o = std::get<ssh_options>(st[0].options);
  CHECK(o.hostname == "web1");
  CHECK(o.port == 2222);
  CHECK(o.username == "deploy");
  CHECK(o.password == "hunter2");
  CHECK(o.identity_files == std::vector<std::string>{"/k/id"});
  CHECK(o.check_host_keys == host_key_policy::accept);
  CHECK(o.connect_timeout == std::chrono::milliseconds(7500));
  CHECK(o.keepalive_interval == std::chrono::seconds(5));
  CHECK(o.python_path == std::vector<std::string>{"/usr/bin/python3"});
  CHECK_FALSE(o.debug);
  const auto& su = std::get<sudo_options>(st[1].options);
  CHECK(su.sudo_args == std::vector<std::string>{"-H", "-E"});
  CHECK(su.password == "pw");
  const auto& so = std::get<su_options>(st[2].options);
  CHECK(so.username == "bob");
  CHECK(so.password_prompts == std::vector<std::string>{"Mot de passe"});
  CHECK(describe_stack(st) == "ssh deploy@web1:2222 (/usr/bin/python3) -> sudo root -> su bob");
}

TEST_CASE("connection stack: a bad hop is refused naming the hop and the key", "[mux][stack]") {
  CHECK(error_of(s("ssh")).find("expected a list of hop dicts") != std::string::npos);
  CHECK(error_of(wire::list{}).find("empty") != std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"hostname", s("x")}})})).find("hop 0 (?): method: missing") != std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"method", s("telnet")}})})).find("unknown connection method 'telnet'") !=
        std::string::npos);
  auto unknown = error_of(stack_of({hop_of({{"method", s("local")}}), hop_of({{"method", s("sudo")}, {"usr", s("x")}})}));
  CHECK(unknown.find("hop 1 (sudo): usr: unknown option of sudo()") != std::string::npos);
  auto type = error_of(stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("h")}, {"port", s("ssh")}})}));
  CHECK(type.find("hop 0 (ssh): port: expected an integer") != std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("h")}, {"port", std::int64_t{70000}}})}))
            .find("out of range") != std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"method", s("ssh")}})})).find("hostname: missing") != std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"method", s("local")}, {"via", s("x")}})})).find("via: not allowed") !=
        std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("h")}, {"check_host_keys", s("maybe")}})}))
            .find("must be 'enforce', 'accept' or 'ignore'") != std::string::npos);
  CHECK(error_of(stack_of({hop_of({{"method", s("local")}, {"debug", s("yes")}})})).find("debug: expected True or False") !=
        std::string::npos);
  // A password of the wrong type is refused without being echoed.
  auto pw = error_of(stack_of({hop_of({{"method", s("sudo")}, {"password", std::int64_t{1234567}}})}));
  CHECK(pw.find("password") != std::string::npos);
  CHECK(pw.find("1234567") == std::string::npos);
}

TEST_CASE("connection stack: the key ignores timeouts and the spelling of defaults", "[mux][stack]") {
  const auto base = key_of(stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")}}),
                                     hop_of({{"method", s("sudo")}})}));
  // The same context, asked for differently.
  CHECK(key_of(stack_of({hop_of({{"method", s("ssh")},
                                 {"hostname", s("web1")},
                                 {"identity_file", wire::list{{s("/k")}}},
                                 {"connect_timeout", std::int64_t{3}},
                                 {"keepalive_interval", std::int64_t{9}},
                                 {"check_host_keys", s("enforce")},
                                 {"transport", s("libssh2")},
                                 {"name", s("nick")},
                                 {"remote_name", s("rn")},
                                 {"debug", true}}),
                         hop_of({{"method", s("sudo")}, {"username", s("root")}, {"password", wire::none{}}}),
                         })) == base);
  // Different contexts: every element of the identity counts.
  for (auto other : {
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web2")}, {"identity_file", s("/k")}}),
                     hop_of({{"method", s("sudo")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")}, {"port", std::int64_t{2}}}),
                     hop_of({{"method", s("sudo")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")}, {"username", s("u")}}),
                     hop_of({{"method", s("sudo")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/j")}}),
                     hop_of({{"method", s("sudo")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")}}),
                     hop_of({{"method", s("sudo")}, {"username", s("bob")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")}}),
                     hop_of({{"method", s("su")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")},
                             {"check_host_keys", s("ignore")}}),
                     hop_of({{"method", s("sudo")}})}),
           stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("web1")}, {"identity_file", s("/k")},
                             {"python_path", s("/opt/py")}}),
                     hop_of({{"method", s("sudo")}})}),
       })
    CHECK(key_of(other) != base);
  // A prefix's key is a prefix of the stack's: the hops a stack shares with another
  // are the same contexts.
  auto st = parse_connection_stack(stack_of({hop_of({{"method", s("local")}}), hop_of({{"method", s("sudo")}})}));
  CHECK(stack_key(st).rfind(stack_key(st, 1), 0) == 0);
  CHECK(stack_key(st, 1) != stack_key(st));
  // No value can be mistaken for another field or hop.
  auto a = key_of(stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("a;username=1:b;")}})}));
  auto b = key_of(stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("a")}, {"username", s("b")}})}));
  CHECK(a != b);
}

TEST_CASE("connection stack: another password, or none, is another context", "[mux][stack]") {
  auto with = [&](std::optional<wire::value> ssh_pw, std::optional<wire::value> sudo_pw) {
    wire::dict a, b;
    a.items = {{s("method"), s("ssh")}, {s("hostname"), s("h")}};
    b.items = {{s("method"), s("sudo")}};
    if (ssh_pw) a.items.emplace_back(s("password"), *ssh_pw);
    if (sudo_pw) b.items.emplace_back(s("password"), *sudo_pw);
    return key_of(stack_of({a, b}));
  };
  const auto base = with(wire::secret{"pw1"}, wire::secret{"pw2"});
  // Secret, str or bytes: the same password.
  CHECK(with(s("pw1"), wire::bytes{"pw2"}) == base);
  CHECK(with(wire::secret{"pw1"}, wire::secret{"other"}) != base);
  CHECK(with(wire::secret{"pw1"}, std::nullopt) != base);
  CHECK(with(std::nullopt, wire::secret{"pw2"}) != base);
  CHECK(with(wire::secret{"pw2"}, wire::secret{"pw1"}) != base);
  CHECK(base.find("pw1") == std::string::npos);
  CHECK(base.find("pw2") == std::string::npos);
}

TEST_CASE("connection stack: a local context's environment is part of its identity", "[mux][stack]") {
  auto st = parse_connection_stack(stack_of({hop_of({{"method", s("local")}})}));
  const auto none = stack_key(st);
  auto with = [&](std::vector<std::string> env) {
    auto copy = st;
    std::get<local_options>(copy[0].options).environment = std::move(env);
    return stack_key(copy);
  };
  CHECK(with({"A=1", "B=2"}) == with({"B=2", "A=1"}));
  CHECK(with({"A=1", "B=2"}) != with({"A=1", "B=3"}));
  CHECK(with({"A=1"}) != none);
  CHECK(with({"SECRET=hunter2"}).find("hunter2") == std::string::npos);
}

TEST_CASE("connection stack: descriptions never show a password", "[mux][stack]") {
  auto st = parse_connection_stack(
      stack_of({hop_of({{"method", s("ssh")}, {"hostname", s("h")}, {"password", wire::secret{"s3cr3t-pw"}}}),
                hop_of({{"method", s("doas")}, {"password", s("s3cr3t-pw")}})}));
  CHECK(describe_stack(st).find("s3cr3t") == std::string::npos);
  CHECK(stack_key(st).find("s3cr3t") == std::string::npos);
  CHECK(describe_stack(st) == "ssh h -> doas root");
}
