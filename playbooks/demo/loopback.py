"""A throw-away ssh target on this machine for the demo (root only):

* a user `mitogen-demo` (created here, marked as throw-away in its GECOS
  field, removed again by stop(); an existing user of that name without the
  mark is refused), who may sudo without a password (a sudoers drop-in,
  checked with visudo, removed by stop());
* an sshd of its own on 127.0.0.1 (a free port), with a fresh host key and a
  fresh user key, letting in only that user, by key only;
* a known_hosts file with the host key, so host keys are checked.

Everything lives in one directory, which stop() removes with the rest.
"""
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

# The tests' loopback sshd helpers (one copy of how to pick a port and make keys).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                'tests', 'core', 'context', 'ssh'))
from sshd_fixture import free_port as _free_port, keygen, run as _run  # noqa: E402

USER = 'mitogen-demo'
GECOS = 'mitogen-native demo (throw-away)'
SUDOERS = '/etc/sudoers.d/mitogen-demo'
SSHD = '/usr/sbin/sshd'


def _keygen(path, comment):
    return ' '.join(keygen(path, comment))


def _ensure_user():
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        # '*': no password can log in, yet the account is not locked (sshd
        # without PAM refuses keys of a locked account too).
        _run('useradd', '-m', '-s', '/bin/bash', '-c', GECOS, '-p', '*', USER)
        return pwd.getpwnam(USER)
    if entry.pw_gecos != GECOS:
        raise SystemExit('demo: a user %s exists and is not the demo\'s own: not touching it'
                         % USER)
    return entry


def _ensure_sudoers():
    rule = '%s ALL=(ALL) NOPASSWD: ALL\n' % USER
    tmp = SUDOERS + '.tmp'
    with open(tmp, 'w') as f:
        f.write(rule)
    os.chmod(tmp, 0o440)
    _run('visudo', '-c', '-q', '-f', tmp)
    os.rename(tmp, SUDOERS)


def start(d):
    """Start everything in directory `d` (created); returns what a playbook
    needs to reach the target, also written to d/target.json."""
    if os.geteuid() != 0:
        raise SystemExit('demo: run as root (it starts an sshd and adds a user)')
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    _ensure_user()
    _ensure_sudoers()
    os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
    host_key = os.path.join(d, 'host_ed25519')
    user_key = os.path.join(d, 'id_ed25519')
    host_pub = _keygen(host_key, 'mitogen-demo-host')
    user_pub = _keygen(user_key, 'mitogen-demo-user')
    auth = os.path.join(d, 'authorized_keys')
    with open(auth, 'w') as f:
        f.write(user_pub + '\n')
    os.chmod(auth, 0o644)
    log = os.path.join(d, 'sshd.log')
    for attempt in range(5):
        port = _free_port()
        known = os.path.join(d, 'known_hosts')
        with open(known, 'w') as f:
            f.write('[127.0.0.1]:%d %s\n' % (port, host_pub))
        conf = os.path.join(d, 'sshd_config')
        with open(conf, 'w') as f:
            f.write('\n'.join([
                'ListenAddress 127.0.0.1',
                'Port %d' % port,
                'HostKey %s' % host_key,
                'PidFile %s' % os.path.join(d, 'sshd.pid'),
                'LogLevel VERBOSE',
                'AuthorizedKeysFile %s' % auth,
                'AllowUsers %s' % USER,
                'PubkeyAuthentication yes',
                'PasswordAuthentication no',
                'KbdInteractiveAuthentication no',
                'UsePAM no',
                'StrictModes no',
                'PermitRootLogin no',
                'MaxStartups 100',
                'MaxSessions 100',
                'PrintMotd no',
                'Subsystem sftp internal-sftp',
                '',
            ]))
        _run(SSHD, '-t', '-f', conf)
        proc = subprocess.Popen([SSHD, '-D', '-f', conf, '-E', log],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        with open(os.path.join(d, 'sshd.child'), 'w') as f:
            f.write(str(proc.pid))
        deadline = time.time() + 10
        while proc.poll() is None and time.time() < deadline:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue    # the port was taken meanwhile, or sshd failed: again
        info = {'host': '127.0.0.1', 'port': port, 'user': USER,
                'identity_file': user_key, 'known_hosts': known, 'dir': d}
        with open(os.path.join(d, 'target.json'), 'w') as f:
            json.dump(info, f)
        return info
    raise SystemExit('demo: sshd did not start: %s' % (open(log).read() if os.path.exists(log) else ''))


def _session_pids(pid):
    """Processes below `pid` (sshd's sessions and what they run)."""
    kids = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name) as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _is_agent(pid):
    """A mitogen-native agent, or its warm fork parent ('mitogen:NAME')."""
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read().startswith(b'mitogen:')
    except OSError:
        return False


def _remove_warm_directories(uid):
    """The user's agents kept warm fork parents' directories in /tmp
    (mitogen_native_target); one killed above could not remove its own."""
    import tempfile
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if name.startswith('mitogen-warm-') and not os.path.islink(path) and \
                os.path.isdir(path) and os.lstat(path).st_uid == uid:
            shutil.rmtree(path, ignore_errors=True)


def stop(d):
    """Stop the sshd started in `d` and every session it holds, remove the
    sudoers rule, the throw-away user and `d`."""
    try:
        with open(os.path.join(d, 'sshd.child')) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        pid = None
    if pid:
        # Sessions whose agents are ending (the demo stopped the daemon that
        # held them) get a moment to finish, so that their warm fork parents
        # remove their directories; then everything left goes.
        deadline = time.time() + 5
        while any(_is_agent(p) for p in _session_pids(pid)) and time.time() < deadline:
            time.sleep(0.05)
        for p in [pid] + _session_pids(pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    try:
        os.unlink(SUDOERS)
    except FileNotFoundError:
        pass
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        entry = None
    if entry is not None and entry.pw_gecos == GECOS:
        _remove_warm_directories(entry.pw_uid)
        # The user's processes (agents) were sessions of that sshd: they are
        # gone, or going; userdel refuses while one is left.
        for _ in range(100):
            if subprocess.run(['userdel', '-r', USER], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode in (0, 6):
                break
            time.sleep(0.1)
        else:
            print('demo: could not remove the user %s (processes left?)' % USER)
    shutil.rmtree(d, ignore_errors=True)
