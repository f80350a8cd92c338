"""mitogen_native.mux: attaching to the multiplexer daemon, sharing its contexts
between processes, and what happens when things die. Each test has a daemon of
its own (conftest.py `mux_env`)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import mitogen_native.core
from mitogen_native import mux
from mux_helpers import pid_alive, run_python, ssh_hop, wait_for

LOCAL = [{'method': 'local'}]

# A client process: attaches (starting the daemon if needed), connects `stack`,
# prints the daemon's pid, the context's id and the agent's pid, detaches.
CLIENT = '''
import os, sys
from mitogen_native import mux
c = mux.attach()
ctx = c.connect(%r)
print(c.daemon_pid, ctx.context_id, ctx.call(os.getpid))
c.detach()
'''


def contexts(client):
    return client.status()['contexts']


def test_attach_starts_the_daemon_and_runs_calls(mux_env):
    assert mux_env.daemon_pids() == []
    with pytest.raises(mitogen_native.core.StreamError, match='not running'):
        mux.attach(start=False)
    c = mux.attach()
    try:
        assert pid_alive(c.daemon_pid)
        assert mux_env.daemon_pids() == [c.daemon_pid]
        ctx = c.connect(LOCAL)
        assert isinstance(ctx, mitogen_native.core.Context)
        agent = ctx.call(os.getpid)
        assert agent not in (os.getpid(), c.daemon_pid)
        assert ctx.call(str.upper, 'hello') == 'HELLO'
        # It keeps the umask of the process that started the daemon (ours).
        mine = os.umask(0o022)
        os.umask(mine)
        assert ctx.call(os.umask, mine) == mine
        assert os.stat(mux_env.socket).st_mode & 0o777 == 0o600
        rx = ctx.call_async(os.getppid)
        assert rx.get(timeout=30) == c.daemon_pid  # the daemon is its parent
        with pytest.raises(mitogen_native.core.CallError, match='ZeroDivisionError'):
            ctx.call(divmod, 1, 0)
        [entry] = contexts(c)
        assert entry['id'] == ctx.context_id
        assert entry['stack'] == 'local'
        assert entry['clients'] == 1
        # The daemon is detached from us: its own session, no terminal.
        assert os.getsid(c.daemon_pid) == c.daemon_pid
    finally:
        c.detach()


ENV_CLIENT = '''
import os, sysconfig
from mitogen_native import mux
c = mux.attach()
ctx = c.connect([{'method': 'local'}])
print(ctx.context_id, ctx.call(os.getenv, 'MUX_TEST_VAR'), ctx.call(sysconfig.get_path, 'stdlib'))
c.detach()
'''


def test_a_local_context_has_its_clients_environment(mux_env):
    import sysconfig
    a1 = run_python(ENV_CLIENT, dict(mux_env.env(), MUX_TEST_VAR='a'))
    a2 = run_python(ENV_CLIENT, dict(mux_env.env(), MUX_TEST_VAR='a'))
    b = run_python(ENV_CLIENT, dict(mux_env.env(), MUX_TEST_VAR='b'))
    assert a1 == a2  # same environment: the same context
    assert a1[1] == 'a' and b[1] == 'b'
    assert b[0] != a1[0]
    # Its interpreter finds its standard library where ours is (the daemon does
    # not run it from "/").
    assert a1[2] == b[2] == sysconfig.get_path('stdlib')


def test_a_second_process_reuses_the_warm_context(mux_env):
    first = run_python(CLIENT % (LOCAL,), mux_env.env())
    second = run_python(CLIENT % (LOCAL,), mux_env.env())
    # Same daemon, same context, same agent process: no new bootstrap.
    assert first == second
    c = mux.attach(start=False)
    try:
        [entry] = contexts(c)
        assert entry['uses'] == 2
        assert entry['clients'] == 0
    finally:
        c.detach()


def test_processes_starting_at_once_share_one_daemon_and_one_context(mux_env):
    procs = [subprocess.Popen([sys.executable, '-c', CLIENT % (LOCAL,)], env=mux_env.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.split())
    assert all(o == outs[0] for o in outs), outs
    assert len(mux_env.daemon_pids()) == 1


MANY_CALLS = '''
import os, sys
from mitogen_native import mux
c = mux.attach()
ctx = c.connect(%r)
pids = set()
for i in range(200):
    assert ctx.call(str.upper, 'x%%d' %% i) == 'X%%d' %% i
    pids.add(ctx.call(os.getpid))
print(len(pids), pids.pop(), c.context_id)
c.detach()
'''


def test_calls_from_many_processes_multiplex_on_one_context(mux_env):
    c = mux.attach()
    try:
        agent = c.connect(LOCAL).call(os.getpid)
        procs = [subprocess.Popen([sys.executable, '-c', MANY_CALLS % (LOCAL,)], env=mux_env.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        client_ids = set()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            n, pid, client_id = out.split()
            assert (int(n), int(pid)) == (1, agent)
            client_ids.add(client_id)
        assert len(client_ids) == 4  # four attachments, one context
        [entry] = contexts(c)
        assert entry['uses'] == 5
    finally:
        c.detach()


def test_reset_makes_the_next_connect_start_a_new_context(mux_env):
    c = mux.attach()
    try:
        ctx = c.connect(LOCAL)
        pid = ctx.call(os.getpid)
        assert c.reset(LOCAL) == 1
        wait_for(lambda: not pid_alive(pid), what='the old agent to exit')
        with pytest.raises(mitogen_native.core.ChannelError):
            ctx.call(os.getpid)
        fresh = c.connect(LOCAL)
        assert fresh.context_id != ctx.context_id
        assert fresh.call(os.getpid) != pid
    finally:
        c.detach()


def test_a_killed_context_fails_its_call_and_the_next_connect_reconnects(mux_env):
    c = mux.attach()
    try:
        ctx = c.connect(LOCAL)
        pid = ctx.call(os.getpid)
        rx = ctx.call_async(time.sleep, 60)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(mitogen_native.core.ChannelError):
            rx.get(timeout=20)
        wait_for(lambda: contexts(c) == [], what='the daemon to forget the context')
        again = c.connect(LOCAL)
        assert again.call(os.getpid) != pid
    finally:
        c.detach()


def test_a_killed_daemon_releases_calls_and_the_next_attach_starts_another(mux_env):
    c = mux.attach()
    try:
        ctx = c.connect(LOCAL)
        agent = ctx.call(os.getpid)
        rx = ctx.call_async(time.sleep, 60)
        old = c.daemon_pid
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(mitogen_native.core.ChannelError):
            rx.get(timeout=20)
        assert time.monotonic() - t0 < 20
        wait_for(lambda: not pid_alive(agent), what='the orphaned agent to exit')
        # The same Client attaches again, to a new daemon, and gets a new context.
        fresh = c.connect(LOCAL)
        assert c.daemon_pid != old
        assert fresh.call(os.getpid) != agent
    finally:
        c.detach()
    # A new process too (the Ansible case: the next task's worker).
    mux_env.stop()
    assert len(run_python(CLIENT % (LOCAL,), mux_env.env())) == 3


def test_a_forked_child_attaches_anew_and_leaves_the_parent_alone(mux_env):
    c = mux.attach()
    try:
        ctx = c.connect(LOCAL)
        agent = ctx.call(os.getpid)
        mine = c.context_id
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                child_ctx = c.connect(LOCAL)
                ok = child_ctx.call(os.getpid) == agent and c.context_id != mine
                c.detach()
                code = 0 if ok else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail('the forked child hung')
            time.sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # The parent's attachment is untouched.
        assert c.context_id == mine
        assert ctx.call(os.getpid) == agent
    finally:
        c.detach()


def test_files_travel_through_the_daemon(mux_env, tmp_path):
    src = tmp_path / 'src.bin'
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    c = mux.attach()
    try:
        ctx = c.connect(LOCAL)
        remote = str(tmp_path / 'remote.bin')
        ctx.put_file(str(src), remote, mode=0o640)
        back = tmp_path / 'back.bin'
        ctx.get_file(remote, str(back))
        assert back.read_bytes() == data
        assert os.stat(remote).st_mode & 0o777 == 0o640
    finally:
        c.detach()


def test_connection_errors_keep_their_kind(mux_env):
    c = mux.attach()
    try:
        with pytest.raises(mitogen_native.core.StreamError, match='/nonexistent/python'):
            c.connect([{'method': 'local', 'python_path': '/nonexistent/python'}])
        with pytest.raises(ValueError, match="hop 0 \\(local\\): hostname: unknown option of local"):
            c.connect([{'method': 'local', 'hostname': 'x'}])
        with pytest.raises(ValueError, match='unknown connection method'):
            c.connect([{'method': 'telnet'}])
        with pytest.raises(TypeError):
            c.connect({'method': 'local'})
        # Nothing was cached by the failures; the attachment still works.
        assert contexts(c) == []
        assert c.connect(LOCAL).call(os.getpid) > 0
    finally:
        c.detach()


def test_status_and_stop_from_the_command_line(mux_env):
    c = mux.attach()
    ctx = c.connect(LOCAL)
    binary = mux.find_binary()
    out = subprocess.run([binary, 'status'], env=mux_env.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'local' in out.stdout and str(ctx.context_id) in out.stdout
    js = subprocess.run([binary, 'status', '--json'], env=mux_env.env(), capture_output=True, text=True,
                        timeout=60)
    st = json.loads(js.stdout)
    assert st['pid'] == c.daemon_pid
    assert [e['id'] for e in st['contexts']] == [ctx.context_id]
    agent = ctx.call(os.getpid)
    daemon = c.daemon_pid
    c.detach()
    out = subprocess.run([binary, 'stop'], env=mux_env.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not pid_alive(daemon)
    wait_for(lambda: not pid_alive(agent), what='its context to exit')
    assert not os.path.exists(mux_env.socket)
    assert subprocess.run([binary, 'status'], env=mux_env.env(), capture_output=True,
                          timeout=60).returncode == 4


def test_the_daemon_exits_after_its_idle_timeout(mux_env):
    mux_env.write_config(idle_timeout=1)
    c = mux.attach()
    ctx = c.connect(LOCAL)
    daemon, agent = c.daemon_pid, ctx.call(os.getpid)
    time.sleep(2.5)  # attached for longer than the timeout: still there
    assert pid_alive(daemon)
    c.detach()
    wait_for(lambda: not pid_alive(daemon), what='the idle daemon to exit')
    wait_for(lambda: not pid_alive(agent), what='its context to exit')
    assert 'no client for 1 s' in mux_env.read_log()


def test_a_bad_settings_file_is_reported_to_the_client(mux_env):
    with open(mux_env.config, 'w') as f:
        f.write('log_file: %s\nidle_timeout: soon\n' % mux_env.log)
    with pytest.raises(mitogen_native.core.StreamError) as e:
        mux.attach()
    assert '%s:2: idle_timeout: expected a number of seconds' % mux_env.config in str(e.value)


TARGET_MODULE = '''
def hello(name):
    return 'hello ' + name
'''


def test_the_daemon_serves_mitogen_native_target_and_nothing_else(mux_env, monkeypatch, tmp_path):
    (tmp_path / 'mitogen_native_target.py').write_text(TARGET_MODULE)
    (tmp_path / 'not_served.py').write_text(TARGET_MODULE)
    monkeypatch.setenv('MITOGEN_MUX_MODULE_DIR', str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    # The context must not find another mitogen_native_target by itself: the
    # build's (PYTHONPATH, which local contexts inherit) or an installed one
    # (site-packages, hence -S).
    monkeypatch.delenv('PYTHONPATH', raising=False)
    sys.modules.pop('mitogen_native_target', None)
    import mitogen_native_target
    import not_served
    c = mux.attach()
    try:
        ctx = c.connect([{'method': 'local', 'python_path': [sys.executable, '-S']}])
        assert ctx.call(mitogen_native_target.hello, 'target') == 'hello target'
        with pytest.raises(mitogen_native.core.CallError, match='not_served'):
            ctx.call(not_served.hello, 'x')
    finally:
        c.detach()
        sys.modules.pop('mitogen_native_target', None)
        sys.modules.pop('not_served', None)


def test_a_rebuilt_module_retires_the_daemon(mux_env, monkeypatch, tmp_path):
    target = tmp_path / 'mitogen_native_target.py'
    target.write_text(TARGET_MODULE)
    monkeypatch.setenv('MITOGEN_MUX_MODULE_DIR', str(tmp_path))
    old = mux.attach()
    try:
        ctx = old.connect(LOCAL)
        old_daemon = old.daemon_pid
        target.write_text(TARGET_MODULE + '\n# rebuilt\n')
        os.utime(str(target), ns=(1, 1))  # whatever the clock's resolution
        new = mux.attach()
        try:
            # A new daemon serves the next client; the old one its own clients.
            assert new.daemon_pid != old_daemon
            assert new.connect(LOCAL).call(os.getpid) != ctx.call(os.getpid)
            assert pid_alive(old_daemon)
        finally:
            new.detach()
    finally:
        old.detach()
    wait_for(lambda: not pid_alive(old_daemon), what='the retired daemon to exit')
    assert 'retiring' in mux_env.read_log()


def test_the_program_and_the_client_agree_on_the_socket(monkeypatch):
    monkeypatch.delenv(mux.SOCKET_ENV, raising=False)
    out = subprocess.run([mux.find_binary(), 'path'], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == mux.socket_path()
    assert os.path.basename(mux.socket_path()) == 'mux-%s.sock' % mux.install_tag()


# -- another user ----------------------------------------------------------------

PEER = '''
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print('refused', e.errno)
    sys.exit(0)
s.settimeout(20)
print('hung-up' if s.recv(1) == b'' else 'greeted')
'''


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to switch to another uid')
def test_another_uid_cannot_attach(mux_env):
    c = mux.attach()
    try:
        ctx = c.connect(LOCAL)

        def as_nobody():
            def drop():
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            p = subprocess.run(['/usr/bin/python3', '-c', PEER, mux_env.socket], preexec_fn=drop,
                               capture_output=True, text=True, timeout=60, env={'PATH': '/usr/bin:/bin'})
            assert p.returncode == 0, p.stderr
            return p.stdout.split()

        import errno
        # The private directory keeps everybody else out...
        assert as_nobody() == ['refused', str(errno.EACCES)]
        # ...and were it opened up, the daemon checks the peer's uid itself.
        os.chmod(mux_env.dir, 0o711)
        os.chmod(mux_env.socket, 0o777)
        assert as_nobody() == ['hung-up']
        wait_for(lambda: 'refused a client of uid 65534' in mux_env.read_log(), what='the refusal in the log')
        assert ctx.call(os.getpid) > 0
        assert c.status()['clients'] == 1
    finally:
        c.detach()


# -- ssh and become through the daemon ---------------------------------------------

def test_ssh_contexts_are_shared_and_reused(mux_env, sshd):
    stack = [ssh_hop(sshd)]
    first = run_python(CLIENT % (stack,), mux_env.env())
    second = run_python(CLIENT % (stack,), mux_env.env())
    assert first == second
    c = mux.attach(start=False)
    try:
        ctx = c.connect(stack)
        import pwd
        assert ctx.call(os.getuid) == pwd.getpwnam(sshd['user']).pw_uid
        assert str(ctx.call(os.getpid)) == first[2]
        [entry] = contexts(c)
        assert entry['stack'] == 'ssh %s@127.0.0.1:%d' % (sshd['user'], sshd['port'])
        assert entry['uses'] == 3
        # A local context and an ssh one side by side.
        assert c.connect(LOCAL).call(os.getuid) == os.getuid()
    finally:
        c.detach()


def test_ssh_failures_keep_their_kind(mux_env, sshd):
    c = mux.attach()
    try:
        with pytest.raises(mitogen_native.core.StreamError) as e:
            c.connect([ssh_hop(sshd, known_hosts_file=sshd['wrong_known_hosts'])])
        assert sshd['host_fingerprint'] in str(e.value)
        with pytest.raises(mitogen_native.core.StreamError, match='(?i)auth'):
            c.connect([ssh_hop(sshd, identity_file=[], password='wrong-password-1234')])
        port = sshd['port']
        with pytest.raises(mitogen_native.core.StreamError, match='(?i)connect'):
            # A port nobody listens on (the sshd's, plus one, is a guess: bound by nobody
            # we know of; the check is only on the error's kind).
            c.connect([ssh_hop(sshd, port=1 if port != 1 else 2, connect_timeout=10)])
        assert contexts(c) == []
        assert 'wrong-password-1234' not in mux_env.read_log()
    finally:
        c.detach()


AGENT_CLIENT = '''
import os, sys
from mitogen_native import mux
import mitogen_native.core
c = mux.attach()
try:
    print(c.connect(%r).call(os.getuid))
except mitogen_native.core.StreamError as e:
    print('failed', str(e).replace(' ', '_'))
c.detach()
'''


def test_each_client_brings_its_own_ssh_agent(mux_env, sshd, tmp_path):
    import pwd
    out = subprocess.run(['ssh-agent', '-s'], capture_output=True, text=True, check=True).stdout
    agent = dict(line.split(';', 1)[0].split('=', 1) for line in out.splitlines()
                 if '=' in line.split(';', 1)[0])
    with_agent = dict(mux_env.env(), **agent)
    without = dict(mux_env.env())
    without.pop('SSH_AUTH_SOCK', None)
    try:
        subprocess.run(['ssh-add', '-q', sshd['identity_file']], env=with_agent, check=True,
                       capture_output=True)
        # Only the agent has a key: the one named does not exist.
        stack = [ssh_hop(sshd, identity_file=str(tmp_path / 'no-such-key'))]
        # The daemon starts in a process that has the agent...
        run_python('from mitogen_native import mux; mux.attach().detach()', with_agent)
        # ...but a client without one does not get to use it.
        failed = run_python(AGENT_CLIENT % (stack,), without)
        assert failed[0] == 'failed' and 'auth' in failed[1].lower(), failed
        ok = run_python(AGENT_CLIENT % (stack,), with_agent)
        assert ok == [str(pwd.getpwnam(sshd['user']).pw_uid)]
    finally:
        subprocess.run(['ssh-agent', '-k'], env=with_agent, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to create its users')
def _descendants(ps_output, roots):
    """The lines of `ps -o pid=,ppid=,args=` output for `roots` and every
    process under them."""
    procs = []
    for line in ps_output.splitlines():
        fields = line.split(None, 2)
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            procs.append((int(fields[0]), int(fields[1]), line))
    keep, grew = set(roots), True
    while grew:
        grew = False
        for pid, ppid, _ in procs:
            if ppid in keep and pid not in keep:
                keep.add(pid)
                grew = True
    return [line for pid, _, line in procs if pid in keep]


def test_become_through_the_daemon_and_no_password_in_ps_or_logs(mux_env, become_users, sshd):
    mux_env.write_config(log_level='debug')
    password = become_users['test_password']
    stack = [{'method': 'local'},
             {'method': 'sudo', 'username': become_users['nosudo_user'],
              'sudo_path': become_users['sudo_as_test'], 'password': password,
              'connect_timeout': 30}]
    ssh_stack = [ssh_hop(sshd, identity_file=[], password=sshd['password'])]
    seen = []
    stop = threading.Event()

    def watch_ps():
        # Every process's command line, as `ps` shows them, all along.
        while not stop.is_set():
            seen.append(subprocess.run(['ps', '-eww', '-o', 'pid=,ppid=,args='],
                                       capture_output=True, text=True).stdout)
            time.sleep(0.02)
    watcher = threading.Thread(target=watch_ps)
    watcher.start()
    c = mux.attach()
    try:
        ctx = c.connect(stack)
        assert ctx.call(os.getuid) == become_users['nosudo_uid']
        assert c.connect(ssh_stack).call(os.getuid) == become_users['test_uid']
        with pytest.raises(mitogen_native.core.PasswordError):
            c.connect([{'method': 'local'},
                       {'method': 'sudo', 'sudo_path': become_users['sudo_as_test'],
                        'password': 'wrong-' + password, 'connect_timeout': 30}])
        # The warm context is reused by whoever gives the same password; without
        # it the attempt is made, and fails as it would without the daemon.
        again = c.connect(stack[:1] + [dict(stack[1], connect_timeout=5)])
        assert again.context_id == ctx.context_id
        with pytest.raises(mitogen_native.core.PasswordError):
            c.connect(stack[:1] + [dict(stack[1], password=None)])
        assert c.connect(stack).context_id == ctx.context_id
    finally:
        stop.set()
        watcher.join()
        c.detach()
    assert seen
    # What the daemon and the sshd start, and what they start: other test suites
    # running at the same time may show the same fixture password in their own
    # command lines (ansible-playbook -e ...), which says nothing about the daemon.
    watched = [line for text in seen for line in _descendants(text, {c.daemon_pid, sshd['pid']})]
    assert any('sudo' in line.split(None, 2)[2] for line in watched), watched[:20]  # the sudo was seen
    for line in watched:
        assert password not in line and sshd['password'] not in line, line
    log = mux_env.read_log()
    assert 'connected local -> sudo %s' % become_users['nosudo_user'] in log
    assert password not in log and sshd['password'] not in log
    for pid in mux_env.daemon_pids():
        for what in ('cmdline', 'environ'):
            with open('/proc/%d/%s' % (pid, what), 'rb') as f:
                assert password.encode() not in f.read()
