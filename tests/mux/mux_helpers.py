"""Helpers of the multiplexer daemon's client tests (the fixtures are in
conftest.py)."""
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import mitogen_native.mux


_PLUGIN_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'plugin')
if _PLUGIN_TESTS not in sys.path:
    sys.path.insert(0, _PLUGIN_TESTS)
from helpers import pid_alive, wait_for  # noqa: E402,F401  (tests/plugin/helpers.py)


class MuxEnv(object):
    """A test's daemon: its socket, settings file and log in a private dir."""

    def __init__(self, root):
        self.dir = root
        self.socket = os.path.join(root, 'mux.sock')
        self.config = os.path.join(root, 'mux.yaml')
        self.log = os.path.join(root, 'mux.log')
        self.write_config()

    def write_config(self, **settings):
        settings.setdefault('log_file', self.log)
        settings.setdefault('idle_timeout', 120)
        with open(self.config, 'w') as f:
            for k, v in settings.items():
                f.write('%s: %s\n' % (k, v))

    def env(self):
        """The environment a client process needs to find this daemon."""
        env = dict(os.environ)
        env[mitogen_native.mux.SOCKET_ENV] = self.socket
        env['MITOGEN_MUX_CONFIG'] = self.config
        return env

    def daemon_pids(self):
        """Processes serving this socket."""
        out = []
        for name in os.listdir('/proc'):
            if not name.isdigit():
                continue
            try:
                with open('/proc/%s/cmdline' % name, 'rb') as f:
                    argv = f.read().split(b'\0')
            except OSError:
                continue
            if b'serve' in argv and self.socket.encode() in argv and pid_alive(int(name)):
                out.append(int(name))
        return out

    def read_log(self):
        try:
            with open(self.log, encoding='utf-8', errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def stop(self):
        binary = mitogen_native.mux.find_binary()
        subprocess.run([binary, 'stop', '--socket', self.socket], env=self.env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        for pid in self.daemon_pids():
            os.kill(pid, 9)


def run_python(code, env, timeout=60):
    """Run `code` in a new /usr/bin/python3 (or whatever runs the tests);
    returns its stdout lines, failing the test if it failed."""
    p = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, 'client process failed:\n%s\n%s' % (p.stdout, p.stderr)
    return p.stdout.split()


def ssh_hop(sshd, **extra):
    """The ssh hop of a stack for the fixture's user, key and known_hosts."""
    hop = {'method': 'ssh', 'hostname': '127.0.0.1', 'port': sshd['port'],
           'username': sshd['user'], 'identity_file': sshd['identity_file'],
           'known_hosts_file': sshd['known_hosts'], 'connect_timeout': 20}
    hop.update(extra)
    return hop


@contextlib.contextmanager
def private_daemon(prefix='mux-'):
    """A :class:`MuxEnv` in a new private directory, its daemon stopped and the
    directory removed afterwards."""
    root = tempfile.mkdtemp(prefix=prefix, dir='/tmp')
    os.chmod(root, 0o700)
    env = MuxEnv(root)
    try:
        yield env
    finally:
        try:
            env.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
