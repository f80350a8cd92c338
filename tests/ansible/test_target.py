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


# ---------------------------------------------------------------------------
# Ansible's housekeeping commands, done without a shell: the commands are
# written by Ansible's own sh shell plugin and wrapped as
# _low_level_execute_command wraps them; each result must be the shell's.

def _ansible_command(body):
    import shlex
    return '/bin/sh -c ' + shlex.quote(body + ' && sleep 0')


def _sh_plugin():
    from ansible.plugins.loader import shell_loader
    return shell_loader.get('sh')


def _both(agent, cmd):
    """(what exec_command gives, what a real login shell gives)"""
    assert agent.call(target._builtin, cmd) is not None, 'not done without a shell: %s' % cmd
    return agent.call(target.exec_command, cmd), \
        agent.call(target._run_piped, ['/bin/sh', '-c', cmd], None, None)


def test_echo_home_is_the_shells(agent):
    sh = _sh_plugin()
    for path, user in (('~', ''), ('~', 'root'), ('~nosuch-user-x', ''), ('~root', '')):
        cmd = _ansible_command(sh.expand_user(path, user))
        ours, shell = _both(agent, cmd)
        assert ours == shell, cmd


def _modes(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = oct(os.lstat(p).st_mode)
    return out


def test_temporary_directory_is_the_shells(agent, tmp_path):
    sh = _sh_plugin()
    results, trees = [], []
    for way in ('ours', 'shell'):
        root = tmp_path / way
        root.mkdir()
        cmd = _ansible_command(sh.mkdtemp('ansible-tmp-1-2-3', tmpdir=str(root / 'a' / 'b')))
        if way == 'ours':
            got = agent.call(target.exec_command, cmd)
            assert agent.call(target._builtin, cmd) is None      # exists now: the shell's turn
        else:
            got = agent.call(target._run_piped, ['/bin/sh', '-c', cmd], None, None)
        results.append((got[0], got[1].replace(str(root).encode(), b'ROOT'), got[2]))
        trees.append(_modes(str(root)))
        # Again: the directory exists; the error is the shell's own.
        again = agent.call(target.exec_command, cmd)
        results.append((again[0], again[1], again[2].replace(str(root).encode(), b'ROOT')))
    assert results[0] == results[2] and results[1] == results[3], results
    assert results[0][0] == 0 and results[1][0] == 1 and b'File exists' in results[1][2], results
    assert trees[0] == trees[1] == {'a': '0o40700', 'a/b': '0o40700',
                                    'a/b/ansible-tmp-1-2-3': '0o40700'}, trees


def test_temporary_directory_failures_are_the_shells(agent, tmp_path):
    sh = _sh_plugin()
    (tmp_path / 'file').write_text('in the way')
    cmd = _ansible_command(sh.mkdtemp('ansible-tmp-1', tmpdir=str(tmp_path / 'file' / 'sub')))
    assert agent.call(target._builtin, cmd) is None
    assert agent.call(target.exec_command, cmd) == \
        agent.call(target._run_piped, ['/bin/sh', '-c', cmd], None, None)


def test_removal_is_the_shells(agent, tmp_path):
    sh = _sh_plugin()
    tree = tmp_path / 'ansible-tmp-9'
    (tree / 'sub').mkdir(parents=True)
    (tree / 'sub' / 'f').write_text('x')
    os.symlink('/nonexistent', str(tree / 'dangling'))
    kept = tmp_path / 'kept'
    kept.mkdir()
    link = tmp_path / 'ansible-tmp-link'
    os.symlink(str(kept), str(link))
    cmd = _ansible_command(sh.remove(str(tree) + '/', recurse=True))
    assert agent.call(target._builtin, cmd) is not None
    assert not tree.exists()
    # Nothing there: success, as rm -f says.
    assert agent.call(target.exec_command, cmd) == (0, b'', b'')
    # A link is rm's to remove (itself, not what it points to).
    cmd = _ansible_command(sh.remove(str(link), recurse=True))
    assert agent.call(target._builtin, cmd) is None
    assert agent.call(target.exec_command, cmd) == (0, b'', b'')
    assert not os.path.lexists(str(link)) and kept.is_dir()


def test_other_commands_go_to_a_shell():
    for cmd in ("/bin/sh -c 'echo ~ $HOME && sleep 0'",
                "/bin/sh -c 'echo '\"'\"'~x y'\"'\"' && sleep 0'",
                "/bin/sh -c 'echo ~'",
                "/bin/sh -c 'rm -f -r /tmp/$X > /dev/null 2>&1 && sleep 0'",
                "/bin/sh -c 'rm -f -r '\"'\"'/tmp/a b'\"'\"' > /dev/null 2>&1 && sleep 0'",
                "/usr/bin/python3 -c 'echo ~ && sleep 0'",
                "sudo -u root /bin/sh -c 'echo ~ && sleep 0'",
                "/bin/sh -c '( umask 77 && mkdir -p \"` echo $HOME/x `\"&& mkdir \"` echo $HOME/x/t `\" "
                "&& echo t=\"` echo $HOME/x/t `\" ) && sleep 0'"):
        assert target._builtin(cmd) is None, cmd
    # A login shell that is not a shell (nologin) refuses everything, as sshd's would.
    assert target._builtin("/bin/sh -c 'echo ~ && sleep 0'", '/usr/sbin/nologin') is None


def test_pipelined_command_parser():
    p = target.pipelined_python
    assert p("/bin/sh -c '/usr/bin/python3 && sleep 0'") == ({}, '/usr/bin/python3', '/bin/sh')
    assert p("LANG=C X='a b' python3") == ({'LANG': 'C', 'X': 'a b'}, 'python3', None)
    assert p("/bin/sh -c 'bash -c '\"'\"'/usr/bin/python3'\"'\"' && sleep 0'") == \
        ({}, '/usr/bin/python3', 'bash')
    for cmd in ('python3 -c 1', 'cd /tmp && python3', 'python3; rm x', 'python3 $X',
                'X="$HOME" python3', 'python3 > out', "sh -c 'python3 | cat'"):
        assert p(cmd) is None, cmd


# ---------------------------------------------------------------------------
# Warm fork parents: AnsiballZ payloads (built here with Ansible's own
# module_common, as a worker builds them) run in a fork of a process that
# imported their module_utils already.

import base64
import io
import json
import re
import time
import zipfile

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'library')
_PAYLOAD_PATH = re.compile(r'/[^\s"\']*?/ansible_\w+?_payload_\w+/ansible_\w+?_payload\.zip')
_VOLATILE = ('start', 'end', 'delta', 'ppid', 'pid', 'parent_is_agent')


def ansiballz(name, args=None, path=None):
    """The pipelined payload of module `name` (a builtin module, or the file
    `path`), as the action plugin sends it."""
    from ansible.executor.module_common import modify_module
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import module_loader
    from ansible.template import Templar
    path = path or module_loader.find_plugin(name, mod_type='.py')
    data, style, _ = modify_module(name, path, dict(args or {}), Templar(DataLoader()),
                                   task_vars={'ansible_python_interpreter': PY},
                                   module_compression='ZIP_DEFLATED')
    assert style == 'new', style
    return data


def rewrite_zip(payload, changes):
    """`payload` with zip entries replaced, added (bytes) or removed (None)."""
    start = payload.index(b'ZIPDATA = """') + len(b'ZIPDATA = """')
    end = payload.index(b'"""', start)
    zin = zipfile.ZipFile(io.BytesIO(base64.b64decode(payload[start:end])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename not in changes:
                zout.writestr(info, zin.read(info))
        for name, content in changes.items():
            if content is not None:
                zout.writestr(name, content)
    return payload[:start] + base64.b64encode(out.getvalue()) + payload[end:]


def normalized(value, warm_zip=None):
    """A module's result with what differs between two runs of the same
    module replaced: its payload's temporary zip, the warm parent's copy."""
    if isinstance(value, dict):
        return dict((k, normalized(v, warm_zip)) for k, v in value.items() if k not in _VOLATILE)
    if isinstance(value, list):
        return [normalized(v, warm_zip) for v in value]
    if isinstance(value, str):
        value = _PAYLOAD_PATH.sub('<payload>', value)
        if warm_zip:
            value = value.replace(warm_zip, '<warm>')
    return value


def run_module(agent, payload, fork_ok=True, warm_ok=True, env=''):
    cmd = "/bin/sh -c '%s%s && sleep 0'" % (env and env + ' ', PY)
    rc, out, err = agent.call(target.exec_command, cmd, payload, False, fork_ok,
                              None, None, None, warm_ok)
    try:
        result = json.loads(out)
    except ValueError:
        result = None
    return rc, out, err, result


def warm_state(agent):
    *parents, diag = agent.call(target.warm_parents)
    return parents, diag


@pytest.fixture
def fresh_agent():
    """An agent of its own (warm parents start from nothing)."""
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    ctx = router.local(python_path=[PY])
    yield ctx
    broker.shutdown()
    broker.join()


MODULES = {
    'probe': dict(path=os.path.join(LIBRARY, 'probe.py')),
    'probe fails': dict(path=os.path.join(LIBRARY, 'probe.py'),
                        args={'exit_code': 3, 'stderr_text': 'problem\n'}),
    'probe raises': dict(path=os.path.join(LIBRARY, 'probe.py'), args={'raise_error': True}),
    'probe garbage': dict(path=os.path.join(LIBRARY, 'probe.py'),
                          args={'stdout_garbage': 'not json'}),
    'warm_probe': dict(path=os.path.join(LIBRARY, 'warm_probe.py')),
    'command': dict(args={'_raw_params': "printf 'a\\nb'", '_uses_shell': False}),
    'command fails': dict(args={'argv': ['ls', '/nonexistent-dir']}),
    'stat': dict(args={'path': '/etc/hostname', 'get_checksum': True}),
    'file': dict(args={'path': '/nonexistent-dir/x', 'state': 'absent'}),
    'ping': dict(args={'data': 'warm'}),
    'bad arguments': dict(path=None, args={'no_such_option': 1}),
}


@pytest.fixture(scope='module')
def payloads():
    out = {}
    for key, spec in MODULES.items():
        name = key.split()[0] if key != 'bad arguments' else 'ping'
        out[key] = ansiballz(name, spec.get('args'), spec.get('path'))
    return out


@pytest.mark.parametrize('name', sorted(MODULES))
def test_warm_run_is_a_fresh_interpreters_run(agent, payloads, name):
    fresh = run_module(agent, payloads[name], fork_ok=False)
    warm = run_module(agent, payloads[name])
    parents, diag = warm_state(agent)
    assert parents, diag
    warm_zip = parents[0]['zip']
    assert warm[0] == fresh[0], (warm, fresh)
    if fresh[3] is None:       # not JSON: exact output, payload paths aside
        assert normalized(warm[1].decode()) == normalized(fresh[1].decode())
    else:
        w, f = normalized(warm[3], warm_zip), normalized(fresh[3], warm_zip)
        if name == 'warm_probe':
            # The one difference, by design: basic.py is the warm parent's.
            assert f.pop('basic_file') == '<payload>/ansible/module_utils/basic.py'
            assert w.pop('basic_file') == '<warm>/ansible/module_utils/basic.py'
        assert w == f
    assert normalized(warm[2].decode()) == normalized(fresh[2].decode())


def test_warm_parent_serves_every_module_with_the_same_code(fresh_agent, payloads):
    agent = fresh_agent
    assert warm_state(agent)[0] == []
    results = []
    for name in ('warm_probe', 'ping', 'command', 'warm_probe', 'stat'):
        rc, out, err, result = run_module(agent, payloads[name])
        assert result is not None, (out, err)
        results.append(result)
    parents, diag = warm_state(agent)
    assert len(parents) == 1, (parents, diag)
    parent = parents[0]
    assert parent['uses'] == 5
    assert 'ansible.module_utils.basic' in parent['modules']
    # basic.py was imported once, by the warm parent: both probes use its copy
    # and are its children.
    for probe in (results[0], results[3]):
        assert probe['basic_file'] == parent['zip'] + '/ansible/module_utils/basic.py'
        assert probe['ppid'] == parent['pid']
        # What basic does not import comes from the probe's own payload.
        assert _PAYLOAD_PATH.match(probe['extra_file']), probe['extra_file']
        assert _PAYLOAD_PATH.match(probe['module_file']), probe['module_file']
        # (the rest of ansible.__path__ is compared with a fresh run above)
        assert normalized(probe['ansible_path'][0]) == '<payload>/ansible', probe['ansible_path']
        assert probe['basic_main_is_the_wrapper'] is True
    # The private directory: the agent's user only, not /tmp itself.
    st = os.stat(parent['directory'])     # the agent runs on this machine
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()
    assert os.path.dirname(parent['zip']) == parent['directory'] != '/tmp'


def test_cached_code_runs_as_compiled_code(fresh_agent, payloads):
    """After a run, the warm parent compiles the payload's other files; later
    runs use that code: its tracebacks name the new payload's files and lines
    exactly as a fresh interpreter's do."""
    fresh = run_module(fresh_agent, payloads['probe raises'], fork_ok=False)
    for _ in range(3):
        warm = run_module(fresh_agent, payloads['probe raises'])
        assert warm[0] == fresh[0] == 1
        assert normalized(warm[2].decode()) == normalized(fresh[2].decode())
        assert 'probe.py", line' in warm[2].decode()
    parents, _ = warm_state(fresh_agent)
    assert parents[0]['compiled'] >= 1     # probe.py at least


def test_no_state_leaks_between_runs(fresh_agent, payloads):
    mutate = ansiballz('warm_probe', {'mutate': True}, os.path.join(LIBRARY, 'warm_probe.py'))
    first = run_module(fresh_agent, mutate)[3]
    second = run_module(fresh_agent, payloads['warm_probe'])[3]
    assert first['leaked'] is None and second['leaked'] is None, (first, second)
    assert second['env_leak'] is None
    assert first['basic_file'] == second['basic_file']    # the same warm parent


def test_other_code_gets_another_warm_parent_or_none(fresh_agent, payloads):
    agent = fresh_agent
    base = run_module(agent, payloads['warm_probe'])[3]
    # Another version of basic.py (another Ansible): never the first parent's code.
    marked = rewrite_zip(payloads['warm_probe'], {
        'ansible/module_utils/basic.py': _entry(payloads['warm_probe'],
                                                'ansible/module_utils/basic.py')
        + b'\nWARM_TEST_MARK = "other basic"\n'})
    other = run_module(agent, marked)[3]
    assert other['marker'] == 'other basic'
    assert other['basic_file'] != base['basic_file']
    parents, _ = warm_state(agent)
    assert len(parents) == 2      # one per content
    again = run_module(agent, payloads['warm_probe'])[3]
    assert again['marker'] is None and again['basic_file'] == base['basic_file']
    # A module_utils file that basic does not import differs: the same warm
    # parent, and the module gets its own payload's version.
    extra = 'ansible/module_utils/common/dict_transformations.py'
    changed = rewrite_zip(payloads['warm_probe'], {
        extra: _entry(payloads['warm_probe'], extra) + b'\nWARM_TEST_MARK = "own extra"\n'})
    own = run_module(agent, changed)[3]
    assert own['extra_marker'] == 'own extra' and own['basic_file'] == base['basic_file']
    # A file that basic imports is missing from the payload: no warm parent
    # may stand in for it (a fresh interpreter would not find it either).
    missing = rewrite_zip(payloads['warm_probe'], {'ansible/module_utils/common/warnings.py': None})
    rc_fresh, out_fresh, _, _ = run_module(agent, missing, fork_ok=False)
    rc_warm, out_warm, _, _ = run_module(agent, missing)
    assert (rc_warm, normalized(out_warm.decode())) == (rc_fresh, normalized(out_fresh.decode()))
    assert rc_fresh != 0
    _, diag = warm_state(agent)
    assert any('warnings' in why for why in diag['failed']), diag


@pytest.mark.parametrize('addition, why', [
    (b'\nimport sys\nsys.stderr.write("basic says hello\\n")\n', 'wrote'),
    (b'\nimport os\nos.environ["SET_BY_BASIC"] = "1"\n', 'changed the environment'),
])
def test_import_with_side_effects_is_not_warmed(fresh_agent, payloads, addition, why):
    """A basic.py that prints or sets the environment when imported: a
    fresh run shows it; a fork of a warm parent would not, so such code gets
    no warm parent and each run imports it itself."""
    payload = rewrite_zip(payloads['warm_probe'], {
        'ansible/module_utils/basic.py': _entry(payloads['warm_probe'],
                                                'ansible/module_utils/basic.py') + addition})
    fresh = run_module(fresh_agent, payload, fork_ok=False)
    warm = run_module(fresh_agent, payload)
    assert warm[0] == fresh[0] == 0, warm
    assert normalized(warm[2].decode()) == normalized(fresh[2].decode())
    w, f = normalized(warm[3]), normalized(fresh[3])
    assert w == f, (w, f)
    parents, diag = warm_state(fresh_agent)
    assert parents == [] and any(why in text for text in diag['failed']), diag


def _entry(payload, name):
    start = payload.index(b'ZIPDATA = """') + len(b'ZIPDATA = """')
    end = payload.index(b'"""', start)
    return zipfile.ZipFile(io.BytesIO(base64.b64decode(payload[start:end]))).read(name)


def test_environment_read_at_import_is_honoured(fresh_agent, payloads):
    agent = fresh_agent
    base = run_module(agent, payloads['warm_probe'])[3]
    parents, _ = warm_state(agent)
    # distro reads UNIXCONFDIR when basic imports it: a run that sets it must
    # not use code imported without it.
    assert 'UNIXCONFDIR' in parents[0]['env_reads']
    other = run_module(agent, payloads['warm_probe'], env='UNIXCONFDIR=/nonexistent')[3]
    assert other['distro_confdir'] == '/nonexistent'
    assert other['basic_file'] != base['basic_file']
    # A variable the import did not read changes nothing.
    same = run_module(agent, payloads['warm_probe'], env='MY_VAR=1')[3]
    assert same['basic_file'] == base['basic_file']


def test_temporary_directory_follows_the_programs_environment(fresh_agent, payloads,
                                                               tmp_path):
    """The agent (and so its forks and warm parents) may have chosen and
    cached tempfile's directory; a program whose environment names another
    one (TMPDIR) uses that, as a fresh interpreter does: plain programs, and
    AnsiballZ payloads (the wrapper unpacks its zip there)."""
    agent = fresh_agent
    run_module(agent, payloads['ping'])      # the agent chose its directory
    assert agent.call(eval, "__import__('tempfile').tempdir") is not None
    env = 'TMPDIR=%s' % tmp_path
    cmd = "/bin/sh -c '%s %s && sleep 0'" % (env, PY)
    program = b'import tempfile\nprint(tempfile.gettempdir())\n'
    forked = agent.call(target.exec_command, cmd, program, False, True)
    fresh = agent.call(target.exec_command, cmd, program, False, False)
    assert forked == fresh == (0, ('%s\n' % tmp_path).encode(), b'')
    rc, out, err, result = run_module(agent, payloads['warm_probe'], env=env)
    assert rc == 0, (out, err)
    assert result['module_file'].startswith('%s/ansible_warm_probe_payload_' % tmp_path), result
    assert result['basic_file'].startswith(warm_state(agent)[0][0]['zip'])   # still warm


def _wait_for(predicate, what, timeout=30):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, 'timed out waiting for ' + what
        time.sleep(0.05)


def _gone(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().split(') ', 1)[1].startswith('Z')
    except OSError:
        return True


def _children(pid):
    """{pid: state letter} of the processes whose parent is `pid` (/proc)."""
    out = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                fields = f.read().rsplit(') ', 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out[int(name)] = fields[0]
    return out


def _spare_of(parent_pid):
    """The warm parent's one child, once it has exactly one that is not a
    zombie: the spare fork waiting for the next run."""
    found = []

    def one_waiting():
        kids = _children(parent_pid)
        found[:] = [p for p, state in kids.items() if state != 'Z']
        return len(kids) == 1 and len(found) == 1
    _wait_for(one_waiting, 'the warm parent %d to have one spare and nothing else'
              % parent_pid)
    return found[0]


def test_each_run_is_served_by_the_spare_forked_before_it(fresh_agent, payloads):
    """A warm parent keeps one fork waiting for the next run, and forks the
    next one after each run; a run's process was there before its request;
    the forks that ran are reaped (no zombies) and nothing else is left."""
    agent = fresh_agent
    fresh = normalized(run_module(agent, payloads['warm_probe'], fork_ok=False)[3])
    run_module(agent, payloads['warm_probe'])
    parents, _ = warm_state(agent)
    parent = parents[0]['pid']
    served = []
    for _ in range(3):
        spare = _spare_of(parent)
        rc, out, err, result = run_module(agent, payloads['warm_probe'])
        assert rc == 0, (out, err)
        assert result['pid'] == spare and result['ppid'] == parent, (result, spare)
        assert normalized(result, parents[0]['zip']).items() >= \
            dict((k, v) for k, v in fresh.items() if k != 'basic_file').items()
        served.append(spare)
    assert len(set(served)) == 3
    _spare_of(parent)     # the next one waits; the three that ran are gone
    for pid in served:
        assert pid not in _children(parent)
    assert [p['pid'] for p in warm_state(agent)[0]] == [parent]


def test_killed_spare_loses_nothing(fresh_agent, payloads):
    """The spare killed while it waits: the next run still gives a fresh
    interpreter's result, the warm parent it belonged to ends, is reaped and
    its directory removed, and a new one serves later runs."""
    agent = fresh_agent
    agent_pid = agent.call(os.getpid)
    fresh = run_module(agent, payloads['ping'], fork_ok=False)
    run_module(agent, payloads['ping'])
    old = warm_state(agent)[0][0]
    spare = _spare_of(old['pid'])
    os.kill(spare, 9)
    # (its parent cannot know how much of a request a killed spare read:
    # it ends, and the agent starts another when it needs one)
    _wait_for(lambda: _gone(old['pid']), 'the warm parent to end with its spare')
    for _ in range(2):
        rc, out, err, result = run_module(agent, payloads['ping'])
        assert (rc, normalized(result), normalized(err.decode())) == \
            (fresh[0], normalized(fresh[3]), normalized(fresh[2].decode()))
    assert not os.path.exists(old['directory'])
    new = warm_state(agent)[0]
    assert [p['pid'] for p in new] != [old['pid']] and len(new) == 1
    kids = _children(agent_pid)
    assert old['pid'] not in kids and spare not in kids, kids   # reaped
    assert 'Z' not in kids.values(), kids
    _spare_of(new[0]['pid'])


def test_ansiballz_compiles_as_the_interpreter_does(payloads):
    """The wrapper compiled without scanning its base64 zip: the same code
    as compile() makes (bytecode, constants, names, lines); anything else
    (a plain program, a syntax error, a compile warning) is left to compile()."""
    def same(a, b):
        assert (a.co_code, a.co_names, a.co_varnames, a.co_freevars, a.co_cellvars,
                a.co_firstlineno, a.co_flags, a.co_name, a.co_filename, a.co_stacksize,
                list(a.co_lines())) == \
            (b.co_code, b.co_names, b.co_varnames, b.co_freevars, b.co_cellvars,
             b.co_firstlineno, b.co_flags, b.co_name, b.co_filename, b.co_stacksize,
             list(b.co_lines()))
        assert len(a.co_consts) == len(b.co_consts)
        for x, y in zip(a.co_consts, b.co_consts):
            if isinstance(x, type(a)):
                same(x, y)
            else:
                assert type(x) is type(y) and x == y
    for name in ('ping', 'stat', 'warm_probe'):
        payload = payloads[name]
        code = target._compile_ansiballz(payload)
        assert code is not None
        same(code, compile(payload, '<stdin>', 'exec', dont_inherit=True))
    assert target._compile_ansiballz(PROGRAMS['prints']) is None
    broken = payloads['ping'].replace(b'def _ansiballz_main():', b'def _ansiballz_main(:', 1)
    assert target._compile_ansiballz(broken) is None
    warns = payloads['ping'].replace(b'def _ansiballz_main():',
                                     b'x = "\\d"\ndef _ansiballz_main():', 1)
    assert target._compile_ansiballz(warns) is None


def test_killed_warm_parent_is_replaced(fresh_agent, payloads):
    agent = fresh_agent
    first = run_module(agent, payloads['warm_probe'])[3]
    parents, _ = warm_state(agent)
    os.kill(parents[0]['pid'], 9)
    _wait_for(lambda: _gone(parents[0]['pid']), 'the warm parent to die')
    second = run_module(agent, payloads['warm_probe'])
    assert second[0] == 0 and second[3]['leaked'] is None, second
    new_parents, _ = warm_state(agent)
    assert [p['pid'] for p in new_parents] != [parents[0]['pid']]
    # Its directory was removed when it was found dead.
    assert not os.path.exists(parents[0]['directory'])
    assert first['basic_file'] != second[3]['basic_file']


def test_directories_of_killed_parents_are_removed_later(fresh_agent, payloads):
    """A warm parent killed with its agent (SIGKILL to a process tree) cannot
    remove its directory: the next warm parent started as that user does."""
    import subprocess
    import tempfile
    dead = subprocess.Popen(['true'])
    dead.wait()                      # a pid nobody uses now
    tmp = tempfile.gettempdir()
    stale = tempfile.mkdtemp(prefix='mitogen-warm-%d-' % dead.pid, dir=tmp)
    with open(os.path.join(stale, 'modlib.zip'), 'wb') as f:
        f.write(b'left behind')
    alive = tempfile.mkdtemp(prefix='mitogen-warm-%d-' % os.getpid(), dir=tmp)
    try:
        run_module(fresh_agent, payloads['ping'])
        assert not os.path.exists(stale)
        assert os.path.isdir(alive)      # its agent (here: this process) lives
        parents, _ = warm_state(fresh_agent)
        agent_pid = fresh_agent.call(os.getpid)
        assert os.path.basename(parents[0]['directory']).startswith(
            'mitogen-warm-%d-' % agent_pid)
    finally:
        os.rmdir(alive)


def test_warm_parents_end_with_the_agent(payloads):
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    agent = router.local(python_path=[PY])
    try:
        run_module(agent, payloads['ping'])
        parents, _ = warm_state(agent)
        assert len(parents) == 1
        stopped_spare = _spare_of(parents[0]['pid'])
        assert agent.call(target.stop_warm_parents) == 1
        _wait_for(lambda: not os.path.exists(parents[0]['directory']),
                  'the stopped parent to remove its directory')
        _wait_for(lambda: _gone(stopped_spare), "the stopped parent's spare to exit")
        run_module(agent, payloads['ping'])
        parents, _ = warm_state(agent)
        spare = _spare_of(parents[0]['pid'])
    finally:
        broker.shutdown()
        broker.join()
    # The agent is gone: its warm parent and the parent's spare see the end of
    # their socket and exit; the parent removes its directory.
    _wait_for(lambda: not os.path.exists(parents[0]['directory']),
              'the warm parent to remove its directory')
    _wait_for(lambda: _gone(parents[0]['pid']), 'the warm parent to exit')
    _wait_for(lambda: _gone(spare), 'the spare to exit')


def test_plain_programs_never_use_a_warm_parent(fresh_agent):
    rc, out, _, = fresh_agent.call(target.exec_command, CMD, PROGRAMS['prints'], False, True)
    assert (rc, out) == (0, b'out\n')
    assert warm_state(fresh_agent)[0] == []


def test_which_payloads_a_warm_parent_holds():
    """The rule (no agent needed): every entry the warm import depended on is
    the same or equally absent, no new top-level name shadows a loaded module,
    and the environment the import read is the same."""
    parent = target._WarmParent(
        pid=0, sock=None, directory='/nonexistent', zip_path='/nonexistent/modlib.zip',
        requires={'ansible/module_utils/basic.py': 'b1', 'ansible/module_utils/gone.py': None},
        tops=frozenset(['ansible']), loaded_tops=frozenset(['ansible', 'json', 'os']),
        env_reads={'UNIXCONFDIR': None, 'X': '1'}, env_all=None, modules=[])
    same = {'ansible/module_utils/basic.py': 'b1', 'ansible/modules/ping.py': 'p'}
    assert parent.holds(same, frozenset(['ansible']))
    # A collection's files come on top: fine.
    assert parent.holds(dict(same, **{'ansible_collections/ns/c/plugins/modules/m.py': 'm'}),
                        frozenset(['ansible', 'ansible_collections']))
    assert not parent.holds(dict(same, **{'ansible/module_utils/basic.py': 'b2'}),
                            frozenset(['ansible']))
    assert not parent.holds({'ansible/modules/ping.py': 'p'}, frozenset(['ansible']))
    # A file the import looked for and did not find is now there.
    assert not parent.holds(dict(same, **{'ansible/module_utils/gone.py': 'g'}),
                            frozenset(['ansible']))
    # A top-level json.py would shadow the json the parent imported.
    assert not parent.holds(dict(same, **{'json.py': 'j'}), frozenset(['ansible', 'json']))
    assert parent.env_ok({'X': '1', 'OTHER': 'y'})
    assert not parent.env_ok({'X': '2'})
    assert not parent.env_ok({'X': '1', 'UNIXCONFDIR': '/etc'})
    everything = target._WarmParent(
        pid=0, sock=None, directory='/nonexistent', zip_path='/nonexistent/modlib.zip',
        requires={}, tops=frozenset(), loaded_tops=frozenset(), env_reads=None,
        env_all={'A': '1'}, modules=[])
    assert everything.env_ok({'A': '1'}) and not everything.env_ok({'A': '1', 'B': '2'})
