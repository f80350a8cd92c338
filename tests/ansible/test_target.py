"""mitogen_native_target in a real agent (a local context): a pipelined
program run in a fork of the agent gives what a fresh interpreter gives."""
import os
import sys

import pytest

import mitogen_native.master
import mitogen_native_target as target

PY = os.path.realpath(sys.executable)
CMD = "/bin/sh -c '%s && sleep 0'" % PY

PROGRAMS = {
    'prints': b'import sys\nprint("out")\nsys.stderr.write("err\\n")\n',
    'exit status': b'import sys\nprint("bye")\nsys.exit(3)\n',
    'exit message': b'import sys\nsys.exit("fatal: message")\n',
    'exception': b'def f():\n    raise ValueError("boom")\nf()\n',
    'syntax error': b'x = (\n',
    'bytes': b'import sys\nsys.stdout.buffer.write(bytes(range(256)))\n'
             b'sys.stderr.buffer.write(b"\\xff\\xfe")\n',
    'unencodable': b'print("\\udcff")\n',
    'stdin at eof': b'import sys\nprint(repr(sys.stdin.read()), sys.stdin.isatty())\n',
    'atexit and threads': b'import atexit, threading, sys\n'
                          b'atexit.register(lambda: print("atexit ran"))\n'
                          b't = threading.Thread(target=lambda: print("thread ran"))\n'
                          b't.start()\n',
    'os._exit': b'import os, sys\nsys.stdout.write("lost")\nos._exit(4)\n',
    'signal': b'import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n',
    'interpreter state': b'import sys, os, json, signal\n'
                         b'print(json.dumps([sys.argv, sys.executable, sys.path, sorted(os.environ.items()),'
                         b' os.getcwd(), sys.flags.utf8_mode, sys.stdout.encoding, sys.stdout.errors,'
                         b' sys.stderr.errors, str(signal.getsignal(signal.SIGPIPE)),'
                         b' sorted(int(f) for f in os.listdir("/proc/self/fd"))[:3],'
                         b' [m for m in sys.modules if m.startswith("mitogen")],'
                         b' getattr(sys.modules["__main__"], "__file__", None)]))\n',
    'env assignment': b'import os\nprint(os.environ.get("MY_VAR"))\n',
}


@pytest.fixture(scope='module')
def agent():
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    ctx = router.local(python_path=[PY])
    yield ctx
    broker.shutdown()
    broker.join()


@pytest.mark.parametrize('name', sorted(PROGRAMS))
def test_forked_run_is_a_fresh_interpreters_run(agent, name):
    cmd = CMD
    if name == 'env assignment':
        cmd = "/bin/sh -c 'MY_VAR='\"'\"'a b'\"'\"' %s && sleep 0'" % PY
    forked = agent.call(target.exec_command, cmd, PROGRAMS[name], False, True)
    fresh = agent.call(target.exec_command, cmd, PROGRAMS[name], False, False)
    assert forked == fresh


def test_the_fork_is_used(agent):
    probe = b'import os\nprint(os.getppid())\n'
    agent_pid = agent.call(os.getpid)
    rc, out, _ = agent.call(target.exec_command, CMD, probe, False, True)
    assert rc == 0 and int(out) == agent_pid
    rc, out, _ = agent.call(target.exec_command, CMD, probe, False, False)
    assert rc == 0 and int(out) != agent_pid
    # Another interpreter, or a startup variable changed: a real process.
    other = "/bin/sh -c 'PYTHONHASHSEED=7 %s && sleep 0'" % PY
    rc, out, _ = agent.call(target.exec_command, other, probe, False, True)
    assert rc == 0 and int(out) != agent_pid


def test_commands_and_terminal(agent):
    assert agent.call(target.exec_command, "printf 'a\\nb'; echo e >&2; exit 5") == \
        (5, b'a\nb', b'e\n')
    assert agent.call(target.exec_command, 'cat', b'\x00in\xff') == (0, b'\x00in\xff', b'')
    # Under a terminal: one stream, CRLF, a terminal on stdin.
    rc, out, err = agent.call(target.exec_command, "echo out; echo err >&2; test -t 0", None, True)
    assert (rc, out, err) == (0, b'out\r\nerr\r\n', b'')


def test_pipelined_command_parser():
    p = target.pipelined_python
    assert p("/bin/sh -c '/usr/bin/python3 && sleep 0'") == ({}, '/usr/bin/python3', '/bin/sh')
    assert p("LANG=C X='a b' python3") == ({'LANG': 'C', 'X': 'a b'}, 'python3', None)
    assert p("/bin/sh -c 'bash -c '\"'\"'/usr/bin/python3'\"'\"' && sleep 0'") == \
        ({}, '/usr/bin/python3', 'bash')
    for cmd in ('python3 -c 1', 'cd /tmp && python3', 'python3; rm x', 'python3 $X',
                'X="$HOME" python3', 'python3 > out', "sh -c 'python3 | cat'"):
        assert p(cmd) is None, cmd
